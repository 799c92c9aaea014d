"""The partition rules name every parameter: norms are replicated by rule, and a parameter no rule
names is an error naming it, never silently copied whole onto every device."""

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from rlhf_jax.models import CausalLM, ModelConfig, ScalarModel, gpt2_config
from rlhf_jax.models.lora import with_lora
from rlhf_jax.parallel.sharding import make_mesh, param_shardings, path_keys, spec_for

CONFIGS = [gpt2_config(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=16),
           ModelConfig(family="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=64, head_dim=8, max_position_embeddings=16, qk_norm=True,
                       tie_word_embeddings=False, scan_layers=True),
           ModelConfig(family="gemma3", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=64, head_dim=8, max_position_embeddings=16, qk_norm=True)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.family)
def test_every_parameter_of_every_family_has_a_rule(cfg):
    mesh = make_mesh(1, 1, 1)
    models = [CausalLM(cfg, rngs=nnx.Rngs(0), value_head=True), ScalarModel(cfg, rngs=nnx.Rngs(0)),
              with_lora(CausalLM(cfg, rngs=nnx.Rngs(0)), 4, 8.0, ("q_proj", "o_proj"))]
    for model in models:
        state = nnx.state(model)
        for decode in (False, True):
            shardings = param_shardings(state, mesh, decode=decode)  # raises on a parameter without a rule
            assert len(jax.tree.leaves(shardings)) == len(jax.tree.leaves(state))
    norms = [path_keys(p) for p, _ in jax.tree_util.tree_leaves_with_path(nnx.state(models[0]))
             if "norm" in str(path_keys(p)[-2])]
    assert norms and all(spec_for(p, (32,), mesh) == P(None) for p in norms)


def test_a_parameter_without_a_rule_is_named():
    mesh = make_mesh(1, 1, 1)
    with pytest.raises(ValueError, match=r"no partition rule for the parameter backbone/layers/0/attn/rel_bias "
                                         r"\(8, 8\)"):
        spec_for(("backbone", "layers", 0, "attn", "rel_bias"), (8, 8), mesh)
    with pytest.raises(ValueError, match="backbone/layers/0/qkv_proj/kernel"):  # a renamed projection
        spec_for(("backbone", "layers", 0, "qkv_proj", "kernel"), (32, 96), mesh)
