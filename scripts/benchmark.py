"""Seconds per PPO (or GRPO) iteration of rlhf_jax at the reference configs, optionally side by side
with the peers' harnesses (TRL, Tunix) in benchmarks/peers. The last line printed is one JSON object.

    python scripts/benchmark.py --preset small                 # 4 layers, width 256, 4 heads
    python scripts/benchmark.py --preset large                 # 6 layers, width 512, 8 heads
    python scripts/benchmark.py --preset smollm2               # SmolLM2-135M's shape, random weights
    python scripts/benchmark.py --preset small --value_model shared
    python scripts/benchmark.py --preset small --peers --rounds 3   # ours, TRL, Tunix alternating
    python scripts/benchmark.py --preset small --algorithm grpo --peers --rounds 3   # GRPO, 8 prompts x 4
    python scripts/benchmark.py --preset small --algorithm grpo --share_prompts off  # each row's prompt run
    python scripts/benchmark.py --preset small --dtype bfloat16 --old_logprobs sampler  # recompute's cost
    python scripts/benchmark.py --preset small --value_model shared --plan   # the planner's estimate vs measured

The reference config: GPT-2-architecture policy, vocabulary 1024, f32; rollout batch 32, prompt 16,
response 32 with no early EOS; 1 PPO epoch, 1 minibatch; a reference copy, a learned reward model
of the same size scored on device, and a separate value model of the same size (the peers'
architecture) or, with --value_model shared, a value head on the policy's trunk.
With --algorithm grpo: 8 prompts x 4 generations (the same 32 responses), a Python reward (the count
of one word in the response, as the peers' harnesses), a reference with k3 KL (0.04) in the loss, no
value model.

--family qwen3: Qwen3 blocks instead (query/key norms, gated MLP of 4 x width, untied head), the
model of Tunix's harnesses. With --peers each round runs ours twice, as GPT-2 (against TRL's GPT-2)
and as Qwen3 (against Tunix's), then the peers; the ratios pair each peer with ours on its model.

The peers' virtual environments: `bash benchmarks/peers/setup_peers.sh` once (about 3 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from rlhf_jax.run.runtime import tune_process

PRESETS = {"small": dict(layers=4, width=256, heads=4), "large": dict(layers=6, width=512, heads=8),
           # SmolLM2-135M's shape (random weights): where the toy presets hide the head, GQA and the cache.
           "smollm2": dict(layers=30, width=576, heads=9, vocab=49152, family="smollm2")}


def build_assets(root: str, args) -> tuple[str, str, str]:
    """A word-level tokenizer with `vocab` tokens, a random reward model folder, a prompts file."""
    import numpy as np
    from flax import nnx
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from rlhf_jax.models import ScalarModel, gpt2_config, save_pretrained

    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(args.vocab - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok_dir = os.path.join(root, "tokenizer")
    fast.save_pretrained(tok_dir)
    cfg = gpt2_config(vocab_size=args.vocab, hidden_size=args.width, num_layers=args.layers, num_heads=args.heads,
                      max_position_embeddings=args.prompt_len + args.response_len)
    rm_dir = os.path.join(root, "reward_model")
    save_pretrained(ScalarModel(cfg, rngs=nnx.Rngs(7)), rm_dir, hf_config={"pad_token_id": 0, "eos_token_id": 1})
    rng = np.random.default_rng(0)
    prompts = os.path.join(root, "prompts.jsonl")
    with open(prompts, "w") as f:
        for _ in range(512):
            f.write(json.dumps({"prompt": " ".join(f"w{i}" for i in rng.integers(0, args.vocab - 3, args.prompt_len))})
                    + "\n")
    return tok_dir, rm_dir, prompts


def target_word_reward(prompts, responses):
    """The GRPO benchmark's reward, as the peers' harnesses compute it: how often the response says "w7"."""
    return [float(r.split().count("w7")) for r in responses]


def make_config(args, tok_dir, rm_dir, prompts):
    from rlhf_jax.config import base_config
    c = base_config()
    c.model.builtin.update(family="gpt2", hidden_size=args.width, num_layers=args.layers, num_heads=args.heads,
                           max_position_embeddings=args.prompt_len + args.response_len)
    if args.family == "smollm2":
        c.model.builtin.update(family="llama", num_kv_heads=3, intermediate_size=1536, rope_theta=100000.0,
                               norm_eps=1e-5)
    if args.family == "qwen3":
        # Tunix's harness model: Qwen3 blocks (query/key norms, gated MLP of 4 x width), untied head.
        c.model.builtin.update(family="llama", qk_norm=True, num_kv_heads=args.heads, intermediate_size=4 * args.width,
                               tie_word_embeddings=False, rope_theta=10000.0, norm_eps=1e-6)
    c.model.update(value_model=args.value_model, dtype=args.dtype, param_dtype=args.dtype)
    c.tokenizer.path = tok_dir
    c.data.update(path=prompts, max_prompt_len=args.prompt_len)
    c.sampling.update(max_new_tokens=args.response_len, temperature=0.7)
    c.train.update(rollout_batch_size=args.batch, num_iterations=args.iters + 1, pack_tokens=args.pack_tokens,
                   micro_rows=args.micro_rows)
    c.rl.update(num_ppo_epochs=1, num_mini_batches=1, old_logprobs=args.old_logprobs)
    if args.algorithm == "ppo":
        c.reward.update(kind="model", model_path=rm_dir)
        c.rl.update(kl_coef=0.05, vf_coef=0.1)
    else:
        # GRPO as DeepSeekMath's (and the peers' defaults): k3 KL in the loss, std-scaled group baseline.
        c.algorithm = "grpo"
        c.reward.kind = "function"  # the trainer's reward_fn is replaced by target_word_reward in run_ours
        c.train.update(num_generations=args.generations, share_prompts=args.share_prompts == "on")
        c.rl.update(kl_coef=0.04, kl_in_loss=True, kl_loss_estimator="k3", loss_aggregation="sequence")
    c.optim.update(learning_rate=3e-6)
    c.logging.update(progress=False, tensorboard=False, samples_every=0)
    return c


def measure_peak(width: int, tokens: int) -> float:
    """FLOP/s of a jitted f32 matmul shaped like the update's biggest ones: [tokens, width] x [width, 4 width]."""
    import jax
    import jax.numpy as jnp
    a = jnp.ones((tokens, width), jnp.float32)
    b = jnp.ones((width, 4 * width), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * tokens * width * 4 * width / statistics.median(times)


def compiled_flops(jitted, *args, trips=None, **kwargs) -> float:
    """Matmul FLOPs of one call, read from the compiled program with every loop counted as often as
    it runs (`rlhf_jax.plan.hlo`; XLA's own cost analysis counts the decode loop's body once; `trips`:
    the runs of the loops the data sizes, as `program_costs` takes them)."""
    from rlhf_jax.plan.hlo import program_costs
    return program_costs(jitted.lower(*args, **kwargs).compile().as_text(), trips).flops


def run_ours(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rlhf_jax.core.packing import micro_trips, packing_stats
    from rlhf_jax.parallel.sharding import batch_devices
    from rlhf_jax.run.trainer import RLTrainer
    from rlhf_jax.step.update import packed_minibatches

    root = tempfile.mkdtemp(prefix="rlhf_bench_")
    tok_dir, rm_dir, prompts = build_assets(root, args)
    config = make_config(args, tok_dir, rm_dir, prompts)
    t0 = time.perf_counter()
    trainer = RLTrainer(config, root)
    # The reference config generates every token (no early EOS), like the peers' harnesses.
    trainer.rollout_fn = trainer.make_rollout_fn(eos_ids=())
    if args.algorithm == "grpo":
        trainer.reward_fn = target_word_reward
    state = trainer.init_state()
    state, _, _ = trainer.iteration(state)  # compiles
    compile_s = time.perf_counter() - t0
    jitted = [trainer.rollout_fn, trainer.update_fn]
    compiles_before = sum(f._cache_size() for f in jitted)
    times, phases = [], {}
    for _ in range(args.iters):
        state, metrics, _ = trainer.iteration(state)
        times.append(metrics["time/iteration"])
        for k, v in metrics.items():
            if k.startswith("time/") and k != "time/iteration":
                phases.setdefault(k[5:], []).append(v)
    compiles_after = sum(f._cache_size() for f in jitted) - compiles_before

    # FLOPs of one iteration's jitted work, from the compiled programs.
    prompt_ids = trainer.to_device_batch(trainer.prompt_ids[:args.batch])
    prompt_mask = trainer.to_device_batch(trainer.prompt_mask[:args.batch])
    rollout_args = (trainer.policy_params(state), prompt_ids, prompt_mask, jax.random.PRNGKey(0))
    rollout_kwargs = dict(reward_params=trainer.rm_params)
    rollout = trainer.rollout_fn(*rollout_args, **rollout_kwargs)
    scores = trainer.to_device_batch(jnp.zeros((args.batch,), jnp.float32))
    # The share of the tokens the update's forwards compute that are a sample's (padded or packed).
    real = int(np.asarray(rollout.prompt_mask).sum() + np.asarray(rollout.response_mask).sum())
    packing, trips = None, None
    if config.train.pack_tokens:
        packing = packed_minibatches(config, state.key, rollout, trainer.pad_id, batch_devices(trainer.mesh))
        stats = packing_stats(packing)
        real_fraction = stats["real_fraction"]
        trips = micro_trips(packing)
    else:
        real_fraction = real / (args.batch * (args.prompt_len + args.response_len))
    update_flops = compiled_flops(trainer.update_fn, state, rollout, scores, trainer.frozen, trainer.update_reference,
                                  packing, trips=trips)
    rollout_flops = compiled_flops(trainer.rollout_fn, *rollout_args, **rollout_kwargs)
    total_flops = update_flops + rollout_flops
    peak = measure_peak(args.width, args.batch * (args.prompt_len + args.response_len))
    median = statistics.median(times)
    update_s = statistics.median(phases["update"])
    return {
        "sec_per_iter_median": median,
        "phase_sec_median": {k: statistics.median(v) for k, v in phases.items()},
        "rollout_tokens_per_s": args.batch * args.response_len / statistics.median(phases["rollout"]),
        "utilisation": total_flops / median / peak,
        "update_utilisation": update_flops / update_s / peak,
        "iteration_gflop": total_flops / 1e9,
        "matmul_peak_gflops": peak / 1e9,
        "compile_s": compile_s,
        "compiles_after_first": int(compiles_after),
        "update_real_fraction": real_fraction,
    }


def run_plan(args) -> dict:
    """The planner on this benchmark's config (local devices): per function the roofline estimate,
    the measured seconds of the compiled function alone, and their ratio."""
    from rlhf_jax.plan.cli import format_table, plan

    root = tempfile.mkdtemp(prefix="rlhf_bench_")
    result = plan(make_config(args, *build_assets(root, args)), measure=True)
    print(format_table(result), file=sys.stderr)
    return {"config": {k: v for k, v in vars(args).items() if not k.startswith("_")}, **result}


def peer_seconds(row: dict) -> float:
    """Median seconds per iteration from a peer harness's JSON line (TRL nests it under `result`)."""
    if "sec_per_iter_median" in row:
        return row["sec_per_iter_median"]
    try:
        return row["result"]["s_per_iter"]["median"]
    except KeyError as e:
        raise KeyError(f"no seconds per iteration in the peer's JSON (keys {sorted(row)})") from e


def run_peers(preset: str, algorithm: str) -> dict:
    bench = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "peers", "run_peers.sh")
    out = subprocess.run(["bash", bench, preset, algorithm], capture_output=True, text=True, timeout=3600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if len(lines) < 2:
        raise RuntimeError(f"the peer harnesses printed no results: {out.stdout[-2000:]} {out.stderr[-2000:]}")
    return {"trl": json.loads(lines[0]), "tunix": json.loads(lines[1])}


def main():
    tune_process()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt_len", type=int, default=16)
    parser.add_argument("--response_len", type=int, default=32)
    parser.add_argument("--iters", type=int, default=5, help="timed iterations after the first (compiling) one")
    parser.add_argument("--algorithm", choices=["ppo", "grpo"], default="ppo",
                        help="grpo: --batch responses, --generations per prompt, a Python reward, no value model")
    parser.add_argument("--generations", type=int, default=4, help="with --algorithm grpo: samples per prompt")
    parser.add_argument("--family", choices=["gpt2", "qwen3", "smollm2"],
                        help="gpt2: TRL's harness model; qwen3: Tunix's (with --peers each peer meets its own)")
    parser.add_argument("--value_model", choices=["separate", "shared"], default="separate")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="model.dtype and model.param_dtype (the peers run f32)")
    parser.add_argument("--old_logprobs", choices=["auto", "recompute", "sampler"], default="auto")
    parser.add_argument("--share_prompts", choices=["on", "off"], default="on",
                        help="with --algorithm grpo: train.share_prompts (each prompt run once for its group)")
    parser.add_argument("--pack_tokens", type=int, default=0, help="train.pack_tokens (0: padded rows)")
    parser.add_argument("--micro_rows", type=int, default=0, help="train.micro_rows (with --pack_tokens)")
    parser.add_argument("--peers", action="store_true",
                        help="also run TRL and Tunix (benchmarks/peers, after its setup_peers.sh), alternating")
    parser.add_argument("--rounds", type=int, default=2, help="with --peers: alternating rounds")
    parser.add_argument("--plan", action="store_true",
                        help="run the planner on this config instead: its roofline estimate beside measured seconds")
    parser.add_argument("--_ours_only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for key, value in {"vocab": 1024, "family": "gpt2", **PRESETS[args.preset]}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.plan:
        print(json.dumps(run_plan(args)))
        return
    if args._ours_only or not args.peers:
        result = {"config": {k: v for k, v in vars(args).items() if not k.startswith("_")}, **run_ours(args)}
        print(json.dumps(result))
        return
    # Alternate whole processes (ours, then the peers) so machine load hits all alike. Each peer meets
    # ours on its own harness's architecture: TRL's GPT-2 and Tunix's Qwen3 (its gated MLP and untied
    # head make it 1.4x the GPT-2 of the same layers, width and heads); at the smollm2 preset Tunix's
    # Qwen3 takes SmolLM2's KV heads and MLP (run_peers.sh), and ours runs the smollm2 family against it
    # (the same matmul FLOPs: no query/key norms, a tied head).
    tunix_family = "smollm2" if args.preset == "smollm2" else "qwen3"
    rounds = []
    for _ in range(args.rounds):
        row = {}
        for family in ("gpt2", tunix_family):
            cmd = [sys.executable, os.path.abspath(__file__), "--_ours_only", f"--family={family}"] + [
                f"--{k}={v}" for k, v in vars(args).items() if not isinstance(v, bool) and k != "family"]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
            if out.returncode:
                raise RuntimeError(f"our run failed ({' '.join(cmd)}):\n{out.stderr[-3000:]}")
            key = "ours_gpt2" if family == "gpt2" else "ours_tunix_model"
            row[key] = json.loads(out.stdout.strip().splitlines()[-1])
        row.update(run_peers(args.preset, args.algorithm))
        rounds.append(row)
    def seconds(key):
        return statistics.median(peer_seconds(r[key]) for r in rounds)

    result = {
        "config": {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "family"},
        "tunix_model": tunix_family,
        **{f"{key}_sec_per_iter": seconds(key) for key in ("ours_gpt2", "trl", "ours_tunix_model", "tunix")},
        "speedup_vs_trl": seconds("trl") / seconds("ours_gpt2"),
        "speedup_vs_tunix": seconds("tunix") / seconds("ours_tunix_model"),
        "speedup_vs_tunix_with_ours_gpt2": seconds("tunix") / seconds("ours_gpt2"),
        "rounds": [{key: peer_seconds(value) for key, value in r.items()} for r in rounds],
        "runs": rounds, "load_avg": os.getloadavg(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
