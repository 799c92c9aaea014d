"""rlhf_jax: RL on language models (KL-regularised PPO and its relatives) in JAX/Flax.

The package in layers, lowest first; a module imports only from the layers before its own
(tests/test_layers.py holds it to that):

  options            the option lists of the config's keys (no imports)
  config | core      the config schema, its checks and loading | the RL math: KL, advantages, losses,
                     the minibatch loop (never reads a config)
  models             Flax NNX decoders, heads, LoRA, Hugging Face weights in and out
  parallel           meshes, partition rules, activation constraints, fused attention kernels
  sampling           the decode loops (`generate`, static; `continuous_generate`, continuous
                     batching) and the rollout
  step               the train state, the training forward, the update of every algorithm
  run                the trainer and its host loop, data, loading, checkpoints, metrics, process setup
  plan               compiling a run for a TPU slice from shapes: AOT, HLO counts, roofline
  tasks | train ...  the built-in example tasks | the command lines (nothing imports either)

The names below are the entry points for your own loop, e.g. `from rlhf_jax import make_update`.
"""

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "base_config": "rlhf_jax.config", "load_config": "rlhf_jax.config",
    "generate": "rlhf_jax.sampling.generate", "continuous_generate": "rlhf_jax.sampling.engine",
    "Rollout": "rlhf_jax.sampling.rollout", "make_rollout": "rlhf_jax.sampling.rollout",
    "TrainState": "rlhf_jax.step.state", "init_train_state": "rlhf_jax.step.state",
    "make_optimizer": "rlhf_jax.step.state",
    "make_scoring": "rlhf_jax.step.forward", "make_update": "rlhf_jax.step.update",
    "RLTrainer": "rlhf_jax.run.trainer", "train": "rlhf_jax.run.loop",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name):
    # Imported on first use: the command lines set the process up before anything imports jax.
    if name not in _PUBLIC:
        raise AttributeError(f"module 'rlhf_jax' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
