"""Held-out accuracy on the arithmetic task: greedy answers of an HF folder's model, scored by the
task's strict exact-match reward (rlhf_jax.tasks.arithmetic).

    python scripts/eval_arithmetic.py --model=runs/smollm2                  # before training
    python scripts/eval_arithmetic.py --model=runs/smollm2_grpo_policy      # the exported policy

The prompts are chat-templated conversations (a worked example, then the question), as in
`configs/smollm2_lora_grpo.py`. Prints a few
answers, then one JSON line: {"model", "problems", "accuracy", "format_ok", "seconds"}.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":  # it may restart the process, so before the heavy imports below
    from rlhf_jax.run.runtime import tune_process
    tune_process()

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax.models import load_pretrained  # noqa: E402
from rlhf_jax.run.cli import user_errors  # noqa: E402
from rlhf_jax.run.data import as_messages, read_prompts, tokenize_prompts  # noqa: E402
from rlhf_jax.run.loading import check_path  # noqa: E402
from rlhf_jax.sampling.generate import generate  # noqa: E402
from rlhf_jax.tasks.arithmetic import exact_match_reward, parse_answer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="an HF folder with config.json, safetensors and a tokenizer")
    parser.add_argument("--problems", default="configs/arithmetic_heldout.jsonl")
    parser.add_argument("--n", type=int, default=300, help="the first N problems")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--max_new_tokens", type=int, default=40)
    parser.add_argument("--max_prompt_len", type=int, default=144)
    parser.add_argument("--pad_token", default="<|endoftext|>", help="as the config's tokenizer.pad_token")
    args = parser.parse_args()
    with user_errors():
        check_path("--model", args.model, "model")
        check_path("--model", args.model, "tokenizer")
        check_path("--problems", args.problems, "file")
        evaluate(args)


def evaluate(args) -> None:
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"
    if args.pad_token:
        tokenizer.pad_token = args.pad_token
    problems = read_prompts(args.problems)[:args.n]
    texts = [tokenizer.apply_chat_template(as_messages(p), tokenize=False, add_generation_prompt=True)
             for p in problems]
    ids, mask, kept, report = tokenize_prompts(texts, tokenizer, args.max_prompt_len, truncation="reject")
    if report.kept != len(texts):
        raise SystemExit(f"{len(texts) - report.kept} problems are longer than --max_prompt_len={args.max_prompt_len}")
    graphdef, params = nnx.split(load_pretrained(args.model))
    eos = (tokenizer.eos_token_id,)
    run = jax.jit(lambda params, ids, mask: generate(graphdef, params, ids, mask, jax.random.PRNGKey(0),
                                                     max_new_tokens=args.max_new_tokens, temperature=0.0,
                                                     eos_ids=eos, pad_id=tokenizer.pad_token_id))
    start = time.time()
    responses = []
    for i in range(0, len(kept), args.batch):
        rows = slice(i, i + args.batch)
        batch_ids, batch_mask = ids[rows], mask[rows]
        short = args.batch - len(batch_ids)  # one compiled shape: pad the last batch with copies
        if short:
            batch_ids = np.concatenate([batch_ids, np.repeat(batch_ids[-1:], short, 0)])
            batch_mask = np.concatenate([batch_mask, np.repeat(batch_mask[-1:], short, 0)])
        out = run(params, jnp.asarray(batch_ids), jnp.asarray(batch_mask))
        for row, length in zip(np.asarray(out["response_ids"]), np.asarray(out["lengths"])):
            responses.append(tokenizer.decode(row[:length], skip_special_tokens=True))
    responses = responses[:len(kept)]
    rewards = exact_match_reward(kept, responses)
    for problem, response, reward in list(zip(problems, responses, rewards))[:3]:
        question = problem if isinstance(problem, str) else problem[-1]["content"]
        print(f"[{'right' if reward else 'wrong'}] {question}\n  -> {response!r}")
    print(json.dumps({"model": args.model, "problems": len(kept), "accuracy": float(np.mean(rewards)),
                      "format_ok": float(np.mean([parse_answer(r) is not None for r in responses])),
                      "seconds": round(time.time() - start, 1)}))


if __name__ == "__main__":
    main()
