#!/usr/bin/env python3
"""CPU baseline for Hugging Face TRL's GRPOTrainer (trl 1.12.0, PyTorch), built offline.

A word-level tokenizer (`<pad>`, `<eos>`, `<bos>`, `<unk>`, then words w0, w1, ...: one word is one
token, so a prompt of N words is N tokens), a GPT-2-architecture policy with random weights saved to a
temporary folder (TRL builds the reference from the same folder), and a Python reward: how often the
completion says the target word. Every completion is --response-len tokens (min_new_tokens), so each
iteration does the same work. One iteration = one generation of prompts x generations completions,
the reference's log-probs, one optimizer step (steps_per_generation 1, num_iterations 1).

The last line printed on stdout is one JSON object: versions, config, seconds per iteration (median
after the first, warm-up, iteration), generation's share, peak RSS.

Run with the venv that setup_peers.sh builds:  $BENCH_VENVS/trl/bin/python trl_grpo_baseline.py --help
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

# Never touch the network: no hub downloads, no telemetry.
for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY",
            "DISABLE_TELEMETRY", "WANDB_DISABLED"):
    os.environ.setdefault(key, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--prompts", type=int, default=8, help="prompts per iteration")
    p.add_argument("--generations", type=int, default=4, help="completions per prompt (GRPOConfig.num_generations)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--response-len", type=int, default=32)
    p.add_argument("--iters", type=int, default=6, help="iterations; the first is a warm-up")
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (k3 in the loss; 0: no reference)")
    p.add_argument("--loss-type", default="grpo", help="GRPOConfig.loss_type (TRL's default is dapo)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--lr", type=float, default=3e-6)
    p.add_argument("--target-word", default="w7")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    return p.parse_args(argv)


def build_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"w{i}" for i in range(vocab - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>", padding_side="left")


def build_model_dir(args, tok) -> str:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, GPT2Config

    cfg = GPT2Config(vocab_size=len(tok), n_positions=-(-(args.prompt_len + args.response_len) // 64) * 64,
                     n_embd=args.width, n_layer=args.layers, n_head=args.heads, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    path = tempfile.mkdtemp(prefix="trl_grpo_policy_")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def versions() -> dict:
    from importlib.metadata import version
    return {"python": platform.python_version(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            **{p: version(p) for p in ("torch", "transformers", "trl", "accelerate", "datasets")}}


def main(argv=None):
    args = parse_args(argv)
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    tok = build_tokenizer(args.vocab)
    model_dir = build_model_dir(args, tok)
    rng = np.random.default_rng(args.seed)
    prompts = [" ".join(f"w{i}" for i in row) for row in rng.integers(0, args.vocab - 4, (512, args.prompt_len))]

    def target_word_reward(completions, **kwargs):
        return [float(c.split().count(args.target_word)) for c in completions]

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_grpo_out_"), report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, use_cpu=True, bf16=False, fp16=False, seed=args.seed,
        data_seed=args.seed, learning_rate=args.lr, max_steps=args.iters, dataloader_num_workers=0,
        per_device_train_batch_size=args.prompts * args.generations, gradient_accumulation_steps=1,
        num_generations=args.generations, steps_per_generation=1, num_iterations=1,
        max_completion_length=args.response_len, generation_kwargs={"min_new_tokens": args.response_len},
        temperature=args.temperature, beta=args.beta, loss_type=args.loss_type, log_completions=False,
    )

    iters, phases = [], {"generate": [], "generate_and_score": []}

    class Timing(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            iters.append(time.perf_counter() - self.t0)

    trainer = GRPOTrainer(model=model_dir, reward_funcs=target_word_reward, args=config,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tok,
                          callbacks=[Timing()])
    trainer.remove_callback(PrinterCallback)

    def timed(name, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            phases[name].append(time.perf_counter() - t0)
            return out
        return wrapper

    trainer._generate = timed("generate", trainer._generate)
    trainer._generate_and_score_completions = timed("generate_and_score", trainer._generate_and_score_completions)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0

    steady = iters[1:]
    median = statistics.median(steady)
    result = {
        "bench": "trl_grpo_baseline",
        "versions": versions(),
        "config": {**vars(args), "torch_threads": torch.get_num_threads(),
                   "params": sum(p.numel() for p in trainer.model.parameters()),
                   "reference": trainer.ref_model is not None, "dtype": "float32"},
        "sec_per_iter_median": median,
        "sec_per_iter_all": iters,
        "phase_sec_median": {k: statistics.median(v[1:]) for k, v in phases.items() if len(v) > 1},
        "gen_tokens_per_s": args.prompts * args.generations * args.response_len
        / statistics.median(phases["generate"][1:]),
        "train_wall_s": wall,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "loadavg_start_end": [load0, os.getloadavg()],
    }
    print(f"[trl grpo] median {median:.3f} s/iter over {len(steady)}", file=sys.stderr)
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
