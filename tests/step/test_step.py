"""The RL iteration as pure functions: compiled from shapes alone, state-carried reward
normalisation, and imports that point one way."""

import ast
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import gpt2_config
from rlhf_jax.parallel.sharding import make_mesh
from rlhf_jax.plan.aot import abstract_iteration
from tests import common
from tests.common import ROOT

# Big enough that creating any weight would show among the live arrays.
MODEL = gpt2_config(vocab_size=4096, hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=32)


@pytest.mark.parametrize("value_model,reward_kind,lora", [("shared", "function", False), ("separate", "model", True)])
def test_rollout_and_update_compile_from_shapes_without_weights(value_model, reward_kind, lora):
    config = common.config()
    config.model.value_model = value_model
    config.reward.kind = reward_kind
    config.lora.enabled = lora
    before = {id(x) for x in jax.live_arrays()}
    step = abstract_iteration(config, MODEL, make_mesh(1, 1, 1))
    leaves = jax.tree.leaves((step.rollout_args, step.rollout_kwargs, step.update_args))
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None for x in leaves)
    rollout = step.lower_rollout().compile()
    update = step.lower_update().compile()
    created = [x.shape for x in jax.live_arrays() if id(x) not in before and x.size >= MODEL.hidden_size ** 2]
    assert not created, created
    embed_bytes = MODEL.vocab_size * MODEL.hidden_size * 4
    # The update's arguments hold the train state (params and Adam moments): more than one embedding.
    assert update.memory_analysis().argument_size_in_bytes > embed_bytes
    assert rollout.memory_analysis().argument_size_in_bytes > embed_bytes
    out = jax.eval_shape(step.rollout_fn, *step.rollout_args, **step.rollout_kwargs)
    b, r = config.train.rollout_batch_size, config.sampling.max_new_tokens
    assert out.logprobs.shape == (b, r)
    # A separate value model is scored by the update; a value head comes along with the samples.
    assert (out.values is None) == (value_model == "separate") and (out.values is None or out.values.shape == (b, r))
    assert (out.scores is None) == (reward_kind == "function")


def test_reference_normalisation_is_state_not_a_traced_constant():
    """Two states differing only in score_stats give differently normalised scores from one compile."""
    from flax import nnx

    from rlhf_jax.models import CausalLM
    from rlhf_jax.sampling.rollout import make_rollout
    from rlhf_jax.step.state import init_train_state, make_optimizer
    from rlhf_jax.step.update import make_update

    config = common.config()
    config.reward.normalize = "reference"
    config.rl.update(num_ppo_epochs=1, num_mini_batches=1)
    cfg = gpt2_config(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, max_position_embeddings=32)
    graphdef, params = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0), value_head=True))
    rollout = make_rollout(config, policy_graphdef=graphdef, eos_ids=(1,), pad_id=0)
    update = make_update(config, policy_graphdef=graphdef, eos_ids=(1,))
    prompts = jnp.asarray(np.random.default_rng(0).integers(2, 32, (16, 4)), jnp.int32)
    batch = rollout(params, prompts, jnp.ones_like(prompts), jax.random.PRNGKey(0))
    raw = jnp.asarray(np.random.default_rng(1).normal(size=16), jnp.float32)
    means = {}
    for mean, std in ((0.0, 1.0), (2.0, 4.0)):
        stats = np.array([100.0, mean, std ** 2 * 100.0], np.float32)  # count, mean, M2
        state = init_train_state(config, {"policy": jax.tree.map(jnp.copy, params)}, make_optimizer(config), stats)
        _, metrics = update(state, batch, raw, reference=params)
        means[mean] = float(metrics["objective/scores"])
    assert update._cache_size() == 1
    np.testing.assert_allclose(means[0.0], float(raw.mean()), rtol=1e-5)
    np.testing.assert_allclose(means[2.0], (float(raw.mean()) - 2.0) / 4.0, rtol=1e-5)


def _library_imports():
    """{module: set of rlhf_jax modules it imports anywhere in its file}, for every module of rlhf_jax."""
    package = os.path.join(ROOT, "rlhf_jax")
    graph = {}
    for folder, _, files in os.walk(package):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
            imported = set()
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rlhf_jax"):
                    imported.add(node.module)
                elif isinstance(node, ast.Import):
                    imported.update(a.name for a in node.names if a.name.startswith("rlhf_jax"))
            graph[module] = imported
    return graph


def test_imports_point_one_way():
    graph = _library_imports()
    library = [m for m in graph if not m.startswith("rlhf_jax.tasks")]
    offenders = {m: sorted(i for i in graph[m] if i.startswith("rlhf_jax.tasks")) for m in library}
    assert not {m: i for m, i in offenders.items() if i}, offenders
    # No cycles between modules (a package's __init__ re-exporting its own submodules is not one).
    def reachable(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen and not start.startswith(nxt + "."):
                    seen.add(nxt)
                    todo.append(nxt)
        return seen
    cycles = [m for m in graph if not m.endswith(("rlhf_jax", "models")) and m in reachable(m)]
    assert not cycles, cycles


def test_trainer_loop_compiles_each_function_once(tmp_path):
    from rlhf_jax.run.trainer import RLTrainer
    config = common.config()
    config.logging.progress = False
    trainer = RLTrainer(config, str(tmp_path))
    state = trainer.init_state()
    for _ in range(3):
        state, _, _ = trainer.iteration(state)
    assert trainer.rollout_fn._cache_size() == 1
    assert trainer.update_fn._cache_size() == 1
