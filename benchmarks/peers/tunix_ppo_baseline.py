#!/usr/bin/env python3
"""CPU baseline: Google Tunix PPO (actor + critic + reference, GAE) on a tiny
randomly initialised decoder, with a programmatic reward function.

Nothing is downloaded: the model is built from a config with random weights, the
"tokenizer" maps whitespace-separated integer strings to token ids, and the
reward is the fraction of completion tokens equal to a target id.

Run (see README.md beside this file):
  $BENCH_VENVS/tunix/bin/python tunix_ppo_baseline.py
The last line printed on stdout is a JSON object with versions, config,
median seconds/iteration after warm-up, generated tokens/s and peak RSS.
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
  p.add_argument("--batch", type=int, default=32, help="rollout batch (prompts per iteration)")
  p.add_argument("--mini-batch", type=int, default=None, help="PPO mini-batch (default: --batch, i.e. 1 optimizer step per epoch)")
  p.add_argument("--prompt-len", type=int, default=16, help="prompt length in tokens incl. BOS")
  p.add_argument("--response-len", type=int, default=32)
  p.add_argument("--ppo-epochs", type=int, default=1, help="PPOConfig.num_iterations")
  p.add_argument("--iters", type=int, default=10, help="timed PPO iterations (after warm-up)")
  p.add_argument("--warmup", type=int, default=2, help="untimed warm-up iterations (JIT compile)")
  p.add_argument("--lr", type=float, default=1e-5)
  p.add_argument("--critic-lr", type=float, default=1e-5)
  p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (0 disables reference model pass)")
  p.add_argument("--kl-method", default="low_var_kl", choices=["low_var_kl", "kl", "mse_kl"])
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--target-token", type=int, default=7, help="reward counts completion tokens equal to this id")
  p.add_argument("--reward-mode", choices=["count", "fraction"], default="count",
                 help="count: number of target tokens (integer-valued, default); fraction: count/len. "
                      "NB tunix 0.1.7 PPO scatters the score into an int32 tensor, so fractional "
                      "scores are truncated to 0 -- see notes")
  p.add_argument("--eos-stop", action="store_true", help="stop at EOS (id 2); default: always generate --response-len tokens")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--quiet", action="store_true", help="silence absl/tqdm chatter")
  return p.parse_args()


ARGS = parse_args()
LOAD_AT_START = round(os.getloadavg()[0], 2)
if ARGS.quiet:
  os.environ.setdefault("TQDM_DISABLE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

from tunix.rl import rl_cluster as rl_cluster_lib  # noqa: E402
from tunix.rl import utils as rl_utils  # noqa: E402
from tunix.rl.ppo import ppo_learner as ppo_lib  # noqa: E402
from tunix.rl.rollout import base_rollout  # noqa: E402
from tunix.utils import env_utils  # noqa: E402

env_utils.setup_sharding_environment()  # as tunix's own tests do

if ARGS.quiet:
  absl_logging.set_verbosity(absl_logging.ERROR)

from tunix_common import FIRST_REAL, IdTokenizer, block_model, build_model, count_params, timed_phase  # noqa: E402

def main():
  args = ARGS
  mini_batch = args.mini_batch or args.batch
  total_iters = args.warmup + args.iters
  rng = np.random.default_rng(args.seed)

  # ---- models: actor, reference (same init), critic (actor copy + value head)
  actor, cfg = build_model(args, args.seed)
  reference, _ = build_model(args, args.seed)
  critic = rl_utils.create_critic_model(actor, seed=args.seed + 1)
  n_actor = count_params(actor)
  n_critic = count_params(critic)

  # Auto axis types as tunix.utils.mesh.create_mesh does; jax>=0.7 make_mesh
  # defaults to Explicit axes, which breaks the sharded embedding gather.
  mesh = jax.make_mesh((1, 1), ("fsdp", "tp"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  kv_cache = args.prompt_len + args.response_len
  rollout_cfg = base_rollout.RolloutConfig(
      max_tokens_to_generate=args.response_len,
      max_prompt_length=args.prompt_len,
      kv_cache_size=kv_cache,
      temperature=args.temperature,
      top_p=1.0,
      top_k=None,
      seed=args.seed,
      # eos id that is never sampled -> every completion is --response-len long
      eos_tokens=None if args.eos_stop else [-1],
  )
  train_cfg = rl_cluster_lib.RLTrainingConfig(
      actor_optimizer=optax.adamw(args.lr),
      critic_optimizer=optax.adamw(args.critic_lr),
      eval_every_n_steps=10**9,
      max_steps=total_iters * (args.batch // mini_batch) * args.ppo_epochs,
      mini_batch_size=mini_batch,
      checkpoint_root_directory=None,
  )
  roles = [rl_cluster_lib.Role.ACTOR, rl_cluster_lib.Role.CRITIC,
           rl_cluster_lib.Role.REFERENCE, rl_cluster_lib.Role.ROLLOUT,
           rl_cluster_lib.Role.REWARD]
  cluster_cfg = rl_cluster_lib.ClusterConfig(
      role_to_mesh={r: mesh for r in roles},
      rollout_engine="vanilla",
      offload_to_cpu=False,
      training_config=train_cfg,
      rollout_config=rollout_cfg,
  )
  t_build0 = time.perf_counter()
  cluster = rl_cluster_lib.RLCluster(
      actor=actor, critic=critic, reference=reference, reward=None,
      tokenizer=IdTokenizer(), cluster_config=cluster_cfg)

  reward_log = []

  def target_fraction_reward(prompts, completions, **kwargs):
    out = []
    for c in completions:
      ids = [int(t) for t in c.split()]
      n = sum(1 for t in ids if t == args.target_token)
      out.append(float(n) if args.reward_mode == "count" else n / max(len(ids), 1))
    reward_log.append(float(np.mean(out)))
    return out

  ppo_cfg = ppo_lib.PPOConfig(
      num_iterations=args.ppo_epochs, beta=args.beta, kl_method=args.kl_method,
      gamma=1.0, gae_lambda=0.95, epsilon=0.2, clip_range_value=0.2)
  learner = ppo_lib.PPOLearner(
      rl_cluster=cluster, ppo_config=ppo_cfg,
      reward_fns=[target_fraction_reward])
  build_s = time.perf_counter() - t_build0

  # ---- timing hooks (each blocks on its outputs so phases are attributable)
  phases = collections.defaultdict(list)  # name -> per-call seconds
  gen_tokens = []

  timed = functools.partial(timed_phase, phases)

  def gen_after(out):
    gen_tokens.append(int(sum(len(t) for t in out.tokens)))

  cluster.generate = timed("rollout", cluster.generate, block_out=False, after=gen_after)
  cluster.get_ref_per_token_logps = timed("ref_logps", cluster.get_ref_per_token_logps)
  cluster.get_old_per_token_logps = timed("old_logps", cluster.get_old_per_token_logps)
  cluster.get_values = timed("critic_values", cluster.get_values)
  cluster.update_actor = timed(
      "actor_update", cluster.update_actor, block_out=False,
      after=lambda _: block_model(cluster.actor_trainer.model))
  cluster.update_critic = timed(
      "critic_update", cluster.update_critic, block_out=False,
      after=lambda _: block_model(cluster.critic_trainer.model))

  iter_times = []
  iter_cpu_times = []  # process CPU seconds (all threads): less sensitive to other load
  orig_global_step = learner._run_global_step  # pylint: disable=protected-access

  def timed_global_step(*a, **kw):
    t0, c0 = time.perf_counter(), time.process_time()
    out = orig_global_step(*a, **kw)
    block_model(cluster.actor_trainer.model)
    block_model(cluster.critic_trainer.model)
    iter_times.append(time.perf_counter() - t0)
    iter_cpu_times.append(time.process_time() - c0)
    if not args.quiet:
      print(f"[iter {len(iter_times)}] {iter_times[-1]:.3f}s "
            f"reward={reward_log[-1] if reward_log else float('nan'):.4f}",
            file=sys.stderr, flush=True)
    return out

  learner._run_global_step = timed_global_step  # pylint: disable=protected-access

  # ---- data: prompt strings of (prompt_len - 1) random ids; sampler adds BOS
  def batches():
    for _ in range(total_iters):
      ids = rng.integers(FIRST_REAL, args.vocab, size=(args.batch, args.prompt_len - 1))
      yield {"prompts": np.array([" ".join(map(str, row)) for row in ids])}

  t_train0 = time.perf_counter()
  learner.train(batches())
  train_s = time.perf_counter() - t_train0

  timed_iters = iter_times[args.warmup:]
  med = statistics.median(timed_iters) if timed_iters else float("nan")
  tokens_per_iter = statistics.median(gen_tokens[args.warmup:]) if timed_iters else 0
  phase_med = {k: round(statistics.median(v[args.warmup:]), 4)
               for k, v in phases.items() if len(v) > args.warmup}
  peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

  def ver(pkg):
    try:
      from importlib.metadata import version
      return version(pkg)
    except Exception:  # pylint: disable=broad-except
      return None

  result = {
      "bench": "tunix_ppo_baseline",
      "versions": {
          "python": platform.python_version(),
          "google-tunix": ver("google-tunix"), "jax": jax.__version__,
          "jaxlib": ver("jaxlib"), "flax": ver("flax"), "optax": ver("optax"),
          "numpy": np.__version__, "qwix": ver("qwix"),
          "orbax-checkpoint": ver("orbax-checkpoint"),
      },
      "platform": {"backend": jax.default_backend(), "devices": len(jax.devices()),
                   "cpu_count": os.cpu_count(),
                   "loadavg_1m_at_start": LOAD_AT_START,
                   "loadavg_1m_at_end": round(os.getloadavg()[0], 2)},
      "config": {
          "model": args.model, "layers": args.layers, "width": args.width,
          "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.width // args.heads,
          "mlp": args.mlp, "vocab": args.vocab, "actor_params": n_actor,
          "critic_params": n_critic, "batch": args.batch, "mini_batch": mini_batch,
          "prompt_len": args.prompt_len, "response_len": args.response_len,
          "ppo_epochs": args.ppo_epochs, "warmup": args.warmup, "iters": args.iters,
          "lr": args.lr, "critic_lr": args.critic_lr, "optimizer": "adamw",
          "beta": args.beta, "kl_method": args.kl_method,
          "temperature": args.temperature, "eos_stop": args.eos_stop,
          "reward": f"{args.reward_mode} of completion tokens == {args.target_token}",
          "dtype": "float32", "seed": args.seed,
      },
      "sec_per_iter_median": round(med, 4),
      "sec_per_iter_min": round(min(timed_iters), 4) if timed_iters else None,
      "sec_per_iter_all": [round(t, 4) for t in iter_times],
      "cpu_sec_per_iter_median": round(statistics.median(iter_cpu_times[args.warmup:]), 4)
      if timed_iters else None,
      "gen_tokens_per_iter": tokens_per_iter,
      "gen_tokens_per_s": round(tokens_per_iter / med, 1) if timed_iters else None,
      "rollout_only_tokens_per_s": round(tokens_per_iter / phase_med["rollout"], 1)
      if "rollout" in phase_med else None,
      "phase_sec_median": phase_med,
      "build_s": round(build_s, 2), "train_total_s": round(train_s, 2),
      "reward_first": round(reward_log[0], 4) if reward_log else None,
      "reward_last": round(reward_log[-1], 4) if reward_log else None,
      "peak_rss_mib": round(peak_rss_mib, 1),
  }
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
