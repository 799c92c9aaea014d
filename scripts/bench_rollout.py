"""The same N requests through the static sampler, the continuous-batching engine and transformers'
`generate`: useful tokens per second, the fraction of decode row-steps that produced a real token, and
the wall time. The last line printed is one JSON object.

Workloads:
  smollm2   SmolLM2-135M-Instruct (`make smollm2`) on the 16 chat-templated questions of
            configs/smollm2_questions.jsonl, --samples each (GRPO's groups), natural lengths;
  hazard    the SmolLM2 shape with random weights (near-uniform next-token distributions) and the
            first --eos_count tokens of the vocabulary as EOS ids, so that a response ends at each
            step with probability about eos_count / vocab: geometric lengths (by default mean a
            quarter of the budget, and about 2% of the rows run to the budget);
  step      where one decode step's time goes at the SmolLM2 shape: --rows rows decoding 16 steps
            in one jitted loop with a cache of --cache_len slots (and of 24), the head and the
            sampler alone, and a large jitted matmul's FLOP/s (this CPU's peak).

    python scripts/bench_rollout.py --workload=smollm2 --new_tokens=256 --engines=static,continuous,hf
    python scripts/bench_rollout.py --workload=hazard --new_tokens=256 --slots=32
    python scripts/bench_rollout.py --workload=step --rows=64 --cache_len=296
"""

if __name__ == "__main__":  # it may restart the process, so before the heavy imports below
    from rlhf_jax.run.runtime import tune_process
    tune_process()

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax.models import CausalLM, load_pretrained
from rlhf_jax.models.hf import config_from_hf, read_hf_config
from rlhf_jax.run.data import as_messages, read_prompts, tokenize_prompts
from rlhf_jax.run.loading import check_path
from rlhf_jax.sampling.engine import continuous_generate
from rlhf_jax.sampling.generate import generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smollm2_requests(model_dir: str, samples: int, prompt_len: int):
    """The chat questions, templated and left-padded, each repeated `samples` times in a row."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    tokenizer.pad_token = "<|endoftext|>"
    raw = read_prompts(os.path.join(ROOT, "configs", "smollm2_questions.jsonl"))
    texts = [tokenizer.apply_chat_template(as_messages(p), tokenize=False, add_generation_prompt=True) for p in raw]
    ids, mask, _, _ = tokenize_prompts(texts, tokenizer, prompt_len)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return (np.repeat(np.asarray(ids), samples, 0), np.repeat(np.asarray(mask), samples, 0), (eos,),
            tokenizer.pad_token_id)


def time_ours(sampler, params, prompts, runs: int, **kw):
    """Compile once (without running), then the median of `runs` timed calls; returns (seconds, the
    last output)."""
    compiled = sampler(params, *prompts, jax.random.key(0), **kw).compile()
    times = []
    for seed in range(runs):
        start = time.perf_counter()
        out = jax.device_get(compiled(params, *prompts, jax.random.key(seed)))
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=("smollm2", "hazard", "step"), default="smollm2")
    parser.add_argument("--rows", type=int, default=64, help="step: rows")
    parser.add_argument("--cache_len", type=int, default=296, help="step: KV cache slots")
    parser.add_argument("--model", default=os.path.join(ROOT, "runs", "smollm2"))
    parser.add_argument("--engines", default="static,continuous", help="comma-separated: static, continuous, hf")
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--samples", type=int, default=4, help="smollm2: samples per question")
    parser.add_argument("--requests", type=int, default=64, help="hazard: requests")
    parser.add_argument("--eos_count", type=int, default=0, help="hazard: EOS ids (0: vocab x 4 / new_tokens)")
    parser.add_argument("--prompt_len", type=int, default=40)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--refill", type=int, default=0, help="requests joining at once (0: --samples)")
    parser.add_argument("--tail_halvings", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    if args.workload == "step":
        print(json.dumps(profile_step(args)))
        return
    engines = args.engines.split(",")
    if unknown := set(engines) - {"static", "continuous", "hf"}:
        sys.exit(f"--engines: unknown {sorted(unknown)}")
    if "hf" in engines and args.workload != "smollm2":
        sys.exit("--engines hf: only with --workload smollm2 (real weights)")

    if args.workload == "smollm2":
        check_path("--model", args.model, "model")
        model = load_pretrained(args.model, dtype=args.dtype, param_dtype=args.dtype)
        ids, mask, eos_ids, pad_id = smollm2_requests(args.model, args.samples, args.prompt_len)
        group = args.samples
    else:
        cfg = config_from_hf(read_hf_config(args.model), dtype=args.dtype, param_dtype=args.dtype)
        model = CausalLM(cfg, rngs=nnx.Rngs(0))
        eos_count = args.eos_count or cfg.vocab_size * 4 // args.new_tokens
        eos_ids, pad_id, group = tuple(range(3, 3 + eos_count)), 0, 1
        rng = np.random.RandomState(0)
        ids = rng.randint(eos_ids[-1] + 1, cfg.vocab_size, (args.requests, args.prompt_len)).astype(np.int32)
        mask = np.ones_like(ids)
    graphdef, params = nnx.split(model)
    n = ids.shape[0]
    common = dict(max_new_tokens=args.new_tokens, temperature=args.temperature, eos_ids=eos_ids, pad_id=pad_id,
                  prompt_group=group)
    prompts = (jnp.asarray(ids), jnp.asarray(mask))
    results = {"workload": args.workload, "requests": n, "new_tokens": args.new_tokens, "dtype": args.dtype,
               "slots": args.slots, "devices": jax.device_count(), "engines": {}}

    def report(name, seconds, lengths, row_steps):
        lengths = np.asarray(lengths)
        useful = int(lengths.sum())
        row = {"seconds": round(seconds, 2), "useful_tokens": useful,
               "useful_tokens_per_s": round(useful / seconds, 1),
               # Decode steps only: each request's first token comes from its prefill.
               "useful_fraction": round((useful - n) / max(row_steps, 1), 3),
               "mean_length": round(float(lengths.mean()), 1), "median_length": float(np.median(lengths)),
               "at_budget": int((lengths == args.new_tokens).sum())}
        results["engines"][name] = row
        print(name, json.dumps(row), flush=True)

    for engine in engines:
        if engine == "static":
            seconds, out = time_ours(functools.partial(generate.lower, graphdef), params, prompts, args.runs,
                                     **common)
            report("static", seconds, out["lengths"], n * (int(out["lengths"].max()) - 1))
        elif engine == "continuous":
            seconds, out = time_ours(functools.partial(continuous_generate.lower, graphdef), params, prompts,
                                     args.runs, slots=args.slots, refill=args.refill,
                                     tail_halvings=args.tail_halvings, **common)
            report("continuous", seconds, out["lengths"], int(out["decode_row_steps"]))
        else:
            seconds, lengths = time_hf(args.model, ids, mask, eos_ids, pad_id, args)
            report("hf", seconds, lengths, n * (int(lengths.max()) - 1))
    print(json.dumps(results))


def best_of(fn, *args, repeats: int = 5) -> float:
    """The median seconds of `fn(*args)` after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def profile_step(args, steps: int = 16) -> dict:
    """Seconds of one decode step (the mean over `steps` in one jitted loop, every slot of the cache
    real) at two cache lengths, of the head and the sampler alone, and the matmul peak."""
    from rlhf_jax.models import init_cache
    from rlhf_jax.sampling.generate import sample_token

    cfg = config_from_hf(read_hf_config(args.model), dtype=args.dtype, param_dtype=args.dtype)
    graphdef, params = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0)))
    rows = args.rows
    uniform = jnp.full((rows,), 0.5)

    @jax.jit
    def decode(params, cache, token):
        model = nnx.merge(graphdef, params)

        def body(_, carry):
            cache, token = carry
            hidden, cache = model.backbone(token, jnp.ones_like(token), cache)
            token, _ = sample_token(model.logits(hidden[:, 0]), uniform, 1.0, 0, 1.0)
            return cache, token[:, None]
        return jax.lax.fori_loop(0, steps, body, (cache, token))[1]

    def step_seconds(cache_len):
        cache = init_cache(cfg, rows, cache_len)
        cache = {**cache, "key_mask": jnp.ones((rows, cache_len), bool),
                 "index": jnp.asarray(cache_len - steps, jnp.int32)}
        return best_of(decode, params, cache, jnp.ones((rows, 1), jnp.int32), repeats=3) / steps

    hidden = jnp.ones((rows, cfg.hidden_size), jnp.float32)
    head = jax.jit(lambda p, h: nnx.merge(graphdef, p).logits(h))
    logits = head(params, hidden)
    sampler = jax.jit(lambda logits: sample_token(logits, uniform, 1.0, 0, 1.0))
    big = jnp.ones((2048, cfg.hidden_size), jnp.float32), jnp.ones((cfg.hidden_size, cfg.intermediate_size))
    matmul_s = best_of(jax.jit(jnp.dot), *big, repeats=20)
    body = sum(x.size for x in jax.tree.leaves(params)) - cfg.vocab_size * cfg.hidden_size  # the tied head aside
    flops = 2 * rows * (body + cfg.vocab_size * cfg.hidden_size)
    short = step_seconds(steps + 8)
    return {"rows": rows, "cache_len": args.cache_len, "step_s": step_seconds(args.cache_len),
            "step_s_short_cache": short, "short_cache_len": steps + 8, "head_s": best_of(head, params, hidden),
            "sampler_s": best_of(sampler, logits), "matmul_gflop_per_step": flops / 1e9,
            "matmul_peak_gflops": 2 * 2048 * cfg.hidden_size * cfg.intermediate_size / matmul_s / 1e9}


def time_hf(model_dir, ids, mask, eos_ids, pad_id, args):
    """transformers' generate on the same prompts, sampling at the same temperature (no top-k)."""
    import torch
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)).eval()
    ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
    times = []
    for seed in range(args.runs):
        torch.manual_seed(seed)
        start = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(input_ids=ids_t, attention_mask=mask_t, do_sample=True, top_k=0, top_p=1.0,
                              temperature=args.temperature, max_new_tokens=args.new_tokens,
                              eos_token_id=list(eos_ids), pad_token_id=pad_id)
        times.append(time.perf_counter() - start)
    response = out[:, ids.shape[1]:].numpy()
    ended = np.isin(response, eos_ids)
    first = np.where(ended.any(1), ended.argmax(1) + 1, response.shape[1])
    return float(np.median(times)), first


if __name__ == "__main__":
    main()
