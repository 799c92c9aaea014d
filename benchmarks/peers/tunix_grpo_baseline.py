#!/usr/bin/env python3
"""CPU baseline: Google Tunix GRPO (actor + reference, group baseline, k3 KL in
the loss) on a tiny randomly initialised decoder with a programmatic reward.

Nothing is downloaded: the model is built from a config with random weights,
the "tokenizer" maps whitespace-separated integer strings to token ids, and the
reward counts completion tokens equal to a target id. Every completion is
--response-len tokens (the stop id is never sampled).

Run (see README.md beside this file):
  $BENCH_VENVS/tunix/bin/python tunix_grpo_baseline.py
The last line printed on stdout is a JSON object with versions, config,
median seconds/iteration after warm-up, phases and peak RSS.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import platform
import resource
import statistics
import sys
import time


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", choices=["qwen3", "llama3"], default="qwen3")
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--width", type=int, default=256, help="embed_dim")
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--kv-heads", type=int, default=4)
  p.add_argument("--mlp", type=int, default=1024, help="MLP hidden dim")
  p.add_argument("--vocab", type=int, default=1024)
  p.add_argument("--prompts", type=int, default=8, help="prompts per iteration")
  p.add_argument("--generations", type=int, default=4, help="completions per prompt")
  p.add_argument("--prompt-len", type=int, default=16, help="prompt length in tokens incl. BOS")
  p.add_argument("--response-len", type=int, default=32)
  p.add_argument("--iters", type=int, default=10, help="timed iterations (after warm-up)")
  p.add_argument("--warmup", type=int, default=2, help="untimed warm-up iterations (JIT compile)")
  p.add_argument("--lr", type=float, default=3e-6)
  p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (0: no reference pass)")
  p.add_argument("--kl-mode", default="low_var_kl", choices=["low_var_kl", "kl", "mse_kl"],
                 help="low_var_kl is k3")
  p.add_argument("--temperature", type=float, default=0.7)
  p.add_argument("--target-token", type=int, default=7)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--quiet", action="store_true", help="silence absl/tqdm chatter")
  return p.parse_args()


ARGS = parse_args()
if ARGS.quiet:
  os.environ.setdefault("TQDM_DISABLE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

from tunix.rl import rl_cluster as rl_cluster_lib  # noqa: E402
from tunix.rl.grpo import grpo_learner as grpo_lib  # noqa: E402
from tunix.rl.rollout import base_rollout  # noqa: E402
from tunix.utils import env_utils  # noqa: E402

from tunix_common import FIRST_REAL, IdTokenizer, block_model, build_model, count_params, timed_phase  # noqa: E402

env_utils.setup_sharding_environment()  # as tunix's own tests do
if ARGS.quiet:
  absl_logging.set_verbosity(absl_logging.ERROR)


def main():
  args = ARGS
  total_iters = args.warmup + args.iters
  rng = np.random.default_rng(args.seed)
  actor, _ = build_model(args, args.seed)
  reference, _ = build_model(args, args.seed)

  mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rollout_cfg = base_rollout.RolloutConfig(
      max_tokens_to_generate=args.response_len, max_prompt_length=args.prompt_len,
      kv_cache_size=args.prompt_len + args.response_len, temperature=args.temperature,
      top_p=1.0, top_k=None, seed=args.seed,
      eos_tokens=[-1])  # an id never sampled: every completion is --response-len long
  train_cfg = rl_cluster_lib.RLTrainingConfig(
      actor_optimizer=optax.adamw(args.lr), eval_every_n_steps=10**9,
      max_steps=total_iters, mini_batch_size=args.prompts, checkpoint_root_directory=None)
  roles = [rl_cluster_lib.Role.ACTOR, rl_cluster_lib.Role.REFERENCE,
           rl_cluster_lib.Role.ROLLOUT, rl_cluster_lib.Role.REWARD]
  cluster = rl_cluster_lib.RLCluster(
      actor=actor, reference=reference, tokenizer=IdTokenizer(),
      cluster_config=rl_cluster_lib.ClusterConfig(
          role_to_mesh={r: mesh for r in roles}, rollout_engine="vanilla",
          offload_to_cpu=False, training_config=train_cfg, rollout_config=rollout_cfg))

  def target_count_reward(prompts, completions, **kwargs):
    return [float(sum(int(t) == args.target_token for t in c.split())) for c in completions]

  grpo_cfg = grpo_lib.GRPOConfig(
      num_generations=args.generations, num_iterations=1, beta=args.beta,
      kl_loss_mode=args.kl_mode, epsilon=0.2)
  learner = grpo_lib.GRPOLearner(rl_cluster=cluster, algo_config=grpo_cfg,
                                 reward_fns=[target_count_reward])

  phases = collections.defaultdict(list)

  timed = functools.partial(timed_phase, phases)

  cluster.generate = timed("rollout", cluster.generate, block_out=False)
  cluster.get_ref_per_token_logps = timed("ref_logps", cluster.get_ref_per_token_logps)
  cluster.update_actor = timed("actor_update", cluster.update_actor, block_out=False,
                               after=lambda _: block_model(cluster.actor_trainer.model))

  iter_times = []
  orig_global_step = learner._run_global_step  # pylint: disable=protected-access

  def timed_global_step(*a, **kw):
    t0 = time.perf_counter()
    out = orig_global_step(*a, **kw)
    block_model(cluster.actor_trainer.model)
    iter_times.append(time.perf_counter() - t0)
    if not args.quiet:
      print(f"[iter {len(iter_times)}] {iter_times[-1]:.3f}s", file=sys.stderr, flush=True)
    return out

  learner._run_global_step = timed_global_step  # pylint: disable=protected-access

  def batches():
    for _ in range(total_iters):
      ids = rng.integers(FIRST_REAL, args.vocab, size=(args.prompts, args.prompt_len - 1))
      yield {"prompts": np.array([" ".join(map(str, row)) for row in ids])}

  t0 = time.perf_counter()
  learner.train(batches())
  train_s = time.perf_counter() - t0
  timed_iters = iter_times[args.warmup:]
  if not timed_iters:
    raise SystemExit(f"only {len(iter_times)} iterations ran (warm-up {args.warmup})")

  def ver(pkg):
    from importlib.metadata import version
    return version(pkg)

  result = {
      "bench": "tunix_grpo_baseline",
      "versions": {"python": platform.python_version(), "google-tunix": ver("google-tunix"),
                   "jax": jax.__version__, "flax": ver("flax"), "optax": ver("optax")},
      "platform": {"backend": jax.default_backend(), "devices": len(jax.devices()),
                   "cpu_count": os.cpu_count()},
      "config": {**vars(args), "actor_params": count_params(actor), "dtype": "float32"},
      "sec_per_iter_median": statistics.median(timed_iters),
      "sec_per_iter_all": iter_times,
      "phase_sec_median": {k: statistics.median(v[args.warmup:]) for k, v in phases.items()
                           if len(v) > args.warmup},
      "train_total_s": train_s,
      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
  }
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
