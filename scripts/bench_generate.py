"""Tokens per second of rlhf_jax's generate against transformers' PyTorch generate (KV cache on).

Same GPT-2-architecture weights (ours, exported with save_pretrained), same batch and lengths,
no early EOS, alternating runs in one process. The last line printed is one JSON object.

    python scripts/bench_generate.py                      # batch 32, prompt 16, 64 new tokens
    python scripts/bench_generate.py --new_tokens=128 --runs=5
"""

if __name__ == "__main__":  # it may restart the process, so before the heavy imports below
    from rlhf_jax.run.runtime import tune_process
    tune_process()

import argparse
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax.models import CausalLM, gpt2_config, save_pretrained
from rlhf_jax.sampling.generate import generate


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt_len", type=int, default=16)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--no_torch", action="store_true", help="time ours only")
    parser.add_argument("--decode_segments", type=int, default=1,
                        help="decode loops, each reading the KV cache as far as it is filled")
    args = parser.parse_args()

    cfg = gpt2_config(vocab_size=args.vocab, hidden_size=args.width, num_layers=args.layers, num_heads=args.heads,
                      max_position_embeddings=args.prompt_len + args.new_tokens)
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    rng = np.random.RandomState(0)
    prompt = rng.randint(0, args.vocab, (args.batch, args.prompt_len)).astype(np.int32)
    mask = np.ones_like(prompt)
    n_tokens = args.batch * args.new_tokens

    def ours(seed):
        out = generate(graphdef, params, jnp.asarray(prompt), jnp.asarray(mask), jax.random.key(seed),
                       max_new_tokens=args.new_tokens, temperature=1.0, eos_ids=(), pad_id=0,
                       decode_segments=args.decode_segments)
        jax.block_until_ready(out["response_ids"])

    t0 = time.perf_counter()
    ours(0)
    compile_s = time.perf_counter() - t0

    theirs = None
    if not args.no_torch:
        import torch
        import transformers
        tmp = tempfile.mkdtemp()
        save_pretrained(model, tmp)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp).eval()
        hf.generation_config.pad_token_id = 0
        prompt_t, mask_t = torch.tensor(prompt, dtype=torch.long), torch.tensor(mask)

        def theirs(seed):
            torch.manual_seed(seed)
            with torch.no_grad():
                out = hf.generate(input_ids=prompt_t, attention_mask=mask_t, do_sample=True, top_k=0,
                                  max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, use_cache=True)
            assert out.shape[1] == args.prompt_len + args.new_tokens
        theirs(0)

    times = {"ours": [], "transformers": []}
    for run in range(args.runs):
        t0 = time.perf_counter()
        ours(run + 1)
        times["ours"].append(time.perf_counter() - t0)
        if theirs is not None:
            t0 = time.perf_counter()
            theirs(run + 1)
            times["transformers"].append(time.perf_counter() - t0)

    result = {
        "config": vars(args) | {"jax_backend": jax.default_backend(), "cpu_count": os.cpu_count()},
        "ours_sec_median": statistics.median(times["ours"]),
        "ours_tokens_per_s": n_tokens / statistics.median(times["ours"]),
        "ours_compile_s": compile_s,
    }
    if times["transformers"]:
        result["transformers_sec_median"] = statistics.median(times["transformers"])
        result["transformers_tokens_per_s"] = n_tokens / statistics.median(times["transformers"])
        result["speedup"] = result["transformers_sec_median"] / result["ours_sec_median"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
