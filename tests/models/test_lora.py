"""LoRA policies: one copy of the base serves policy and reference; exact KL 0 at step 0;
merged and PEFT-layout export; a short LoRA PPO run learns."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.models import load_pretrained, save_pretrained
from rlhf_jax.models.lora import load_adapters, save_adapters, with_lora
from rlhf_jax.run.trainer import RLTrainer
from rlhf_jax.sampling.rollout import sequence_logprobs
from rlhf_jax.tasks.demo import demo_config


def lora_config(workdir, **lora):
    config = demo_config(str(workdir))
    settings = dict(enabled=True, rank=4, alpha=8.0, targets=("q_proj", "v_proj", "o_proj", "up_proj"))
    config.lora.update({**settings, **lora})
    config.train.rollout_batch_size = 16
    config.logging.progress = False
    config.checkpoint.every = 0
    return config


def teacher_forced(trainer, graphdef, params, out, prompt_ids, prompt_mask):
    ids = jnp.concatenate([prompt_ids, out["response_ids"]], 1)
    mask = jnp.concatenate([prompt_mask, out["response_mask"]], 1)
    return np.asarray(sequence_logprobs(graphdef, params, ids, mask, out["response_ids"],
                                        trainer.config.sampling.temperature))


def step0_logprobs(trainer):
    state = trainer.init_state()
    prompt_ids, prompt_mask = jnp.asarray(trainer.prompt_ids[:16]), jnp.asarray(trainer.prompt_mask[:16])
    out = trainer.generate(trainer.policy_params(state), prompt_ids, prompt_mask, jax.random.PRNGKey(0))
    policy = teacher_forced(trainer, trainer.policy_graphdef, trainer.policy_params(state), out, prompt_ids,
                            prompt_mask)
    reference = teacher_forced(trainer, trainer.ref_graphdef, trainer.ref_params, out, prompt_ids, prompt_mask)
    return state, policy, reference, np.asarray(out["response_mask"]).astype(bool)


def unique_bytes(*trees):
    seen, total = set(), 0
    for leaf in jax.tree.leaves(trees):
        if isinstance(leaf, jax.Array) and leaf.unsafe_buffer_pointer() not in seen:
            seen.add(leaf.unsafe_buffer_pointer())
            total += leaf.nbytes
    return total


@pytest.fixture(scope="module")
def demo_copy(tmp_path_factory, demo_workdir):
    root = tmp_path_factory.mktemp("lora")
    shutil.copytree(demo_workdir / "sft_model", root / "sft_model")
    return root


def test_step0_kl_is_exactly_zero_and_one_base_copy(demo_copy, tmp_path):
    trainer = RLTrainer(lora_config(demo_copy), str(tmp_path))
    state, policy, reference, mask = step0_logprobs(trainer)
    np.testing.assert_array_equal(policy[mask], reference[mask])  # exactly, not approximately

    # The reference is the base with fresh adapters (B = 0): the same buffers as the policy's frozen
    # base, plus a snapshot of the adapters.
    frozen = {leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(trainer.frozen)}
    ref_base = [leaf for path, leaf in nnx.to_flat_state(trainer.ref_params)
                if not any(k in ("lora_a", "lora_b", "value_head") for k in path)]
    assert {leaf[...].unsafe_buffer_pointer() for leaf in ref_base} <= frozen
    base_bytes = unique_bytes(trainer.frozen)
    adapter_bytes = unique_bytes(state.params)  # adapters + the value head
    total = unique_bytes(state.params, state.opt_state, trainer.frozen, trainer.ref_params)
    copies = 4  # the adapters, Adam's mu and nu, the reference's snapshot
    assert total <= base_bytes + 1.1 * adapter_bytes * copies, (total, base_bytes, adapter_bytes)
    assert adapter_bytes < 0.2 * base_bytes


def test_pretrained_adapters_are_the_reference(demo_copy, tmp_path):
    # A "LoRA SFT": adapters that already changed the model.
    base = load_pretrained(str(demo_copy / "sft_model"))
    adapted = with_lora(base, 4, 8.0, ("o_proj", "up_proj", "down_proj"), seed=1)
    lora_state = nnx.state(adapted, nnx.LoRAParam)
    nnx.update(adapted, jax.tree.map(lambda x: x + 0.05, lora_state))
    save_adapters(adapted, str(tmp_path / "sft_adapters"))
    trainer = RLTrainer(lora_config(demo_copy, targets=("o_proj",), adapter_path=str(tmp_path / "sft_adapters")),
                         str(tmp_path / "run"))
    state, policy, reference, mask = step0_logprobs(trainer)
    np.testing.assert_array_equal(policy[mask], reference[mask])
    # ... and that reference is not the bare base.
    bare = RLTrainer(lora_config(demo_copy), str(tmp_path / "bare"))
    _, _, bare_reference, _ = step0_logprobs(bare)
    assert np.abs(bare_reference[mask] - reference[mask]).max() > 1e-3


def test_merged_export_matches_transformers_and_adapters_round_trip(demo_copy, tmp_path):
    torch = pytest.importorskip("torch")
    import transformers
    base = load_pretrained(str(demo_copy / "sft_model"))
    adapted = with_lora(base, 4, 8.0, ("o_proj", "up_proj", "down_proj"), seed=2)
    nnx.update(adapted, jax.tree.map(lambda x: x + 0.03, nnx.state(adapted, nnx.LoRAParam)))
    ids = jnp.asarray(np.random.RandomState(0).randint(3, 60, (2, 9)), jnp.int32)
    mask = jnp.ones_like(ids)
    ours = np.asarray(adapted(ids, mask)["logits"])
    assert np.abs(ours - np.asarray(base(ids, mask)["logits"])).max() > 1e-3  # the adapters matter
    save_pretrained(adapted, str(tmp_path / "merged"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    save_adapters(adapted, str(tmp_path / "adapters"))
    assert sorted(os.listdir(tmp_path / "adapters")) == ["adapter_config.json", "adapter_model.safetensors"]
    reloaded = load_adapters(load_pretrained(str(demo_copy / "sft_model")), str(tmp_path / "adapters"))
    np.testing.assert_allclose(np.asarray(reloaded(ids, mask)["logits"]), ours, atol=1e-6)


def test_short_lora_ppo_run_raises_reward(demo_copy, tmp_path):
    from rlhf_jax.run.loop import train
    config = lora_config(demo_copy, rank=8, targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"))
    config.train.rollout_batch_size = 64
    config.train.num_iterations = 25
    config.optim.learning_rate = 3e-3
    _, state, history = train(config, str(tmp_path))
    scores = [m["objective/scores"] for m in history]
    assert np.mean(scores[-5:]) > np.mean(scores[:3]) + 0.5, scores
    assert set(state.params["policy"]["backbone"]["layers"][0]["attn"]["q_proj"].keys()) == {"lora_a", "lora_b"}
