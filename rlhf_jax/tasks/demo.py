"""The offline demo: a whole RLHF run on the built-in movie-review task.

    python -m rlhf_jax.tasks.demo --workdir=runs/demo      (what `make demo` runs)

1. a word-level tokenizer for the review grammar;
2. the "original model": a tiny GPT-2-architecture policy warmed up on grammar
   reviews (cached in the workdir, so later runs skip it);
3. PPO against the lexicon sentiment reward with the adaptive KL controller;
4. a before/after summary (reward, KL to the original model, share of valid
   reviews, samples), metrics as JSONL + TensorBoard, and a PNG plot.
"""

from __future__ import annotations

if __name__ == "__main__":  # it may restart the process, so before the heavy imports below
    from rlhf_jax.run.runtime import tune_process
    tune_process()

import argparse
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rlhf_jax.config import base_config, set_key
from rlhf_jax.models import CausalLM, gpt2_config, save_pretrained
from rlhf_jax.step.sft import sft_step
from rlhf_jax.tasks import reviews

log = logging.getLogger(__name__)

SFT_SEQ_LEN = 32


def demo_config(workdir: str = "runs/demo"):
    """PPO from the warmed-up model in `workdir/sft_model` against the sentiment lexicon."""
    c = base_config()
    c.model.path = os.path.join(workdir, "sft_model")
    c.reward.function = "rlhf_jax.tasks.reviews:sentiment_reward"
    c.data.max_prompt_len = 4
    c.sampling.max_new_tokens = 24
    c.sampling.temperature = 1.0
    c.train.rollout_batch_size = 64
    c.train.num_iterations = 80
    # The controller's horizon is short on purpose: with 64 samples an iteration it can move the
    # coefficient by up to 2.5% per iteration, enough to hold the KL near its target within a short run.
    c.rl.update(kl_coef=0.2, adaptive_kl=True, kl_target=4.0, kl_horizon=500.0, kl_estimator="k1",
                 num_ppo_epochs=4, num_mini_batches=2, vf_coef=0.1, gamma=1.0, lam=0.95,
                 missing_eos_penalty=1.0)
    c.optim.update(learning_rate=1e-3, max_grad_norm=1.0)
    c.checkpoint.every = 20
    c.logging.samples_every = 10
    return c


def valid_fraction(prompts, responses, ended):
    """1.0 for a response that ended with EOS and completes a valid review, else 0.0."""
    return [float(e and reviews.is_valid(p + " " + r)) for p, r, e in zip(prompts, responses, ended)]


def warm_up(workdir: str, tokenizer, steps: int = 300, batch: int = 64, seed: int = 0) -> str:
    """Train the "original model" on grammar reviews and save it as an HF folder (skipped when cached)."""
    folder = os.path.join(workdir, "sft_model")
    if os.path.exists(os.path.join(folder, "model.safetensors")):
        print(f"[demo] original model: cached in {folder}")
        return folder
    t0 = time.time()
    rng = np.random.default_rng(seed)
    cfg = gpt2_config(vocab_size=len(tokenizer), hidden_size=128, num_layers=2, num_heads=4,
                      max_position_embeddings=SFT_SEQ_LEN)
    model = CausalLM(cfg, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(optax.cosine_decay_schedule(3e-3, steps)))
    opt_state = optimizer.init(params)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    texts = [reviews.sample_review(rng) for _ in range(steps * batch // 4)]
    encoded = [ids[:SFT_SEQ_LEN - 1] + [eos] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    ids = np.full((len(encoded), SFT_SEQ_LEN), pad, np.int32)
    mask = np.zeros_like(ids)
    for i, row in enumerate(encoded):
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    for step in range(steps):
        pick = rng.integers(0, len(ids), batch)
        params, opt_state, loss = sft_step(graphdef, params, opt_state, jnp.asarray(ids[pick]),
                                           jnp.asarray(mask[pick]), optimizer=optimizer)
        if step % 100 == 0 or step == steps - 1:
            print(f"[demo] warm-up step {step:4d}/{steps}: next-token loss {float(loss):.3f}")
    save_pretrained(nnx.merge(graphdef, params), folder,
                    hf_config={"pad_token_id": pad, "eos_token_id": eos, "bos_token_id": eos})
    tokenizer.save_pretrained(folder)
    print(f"[demo] original model saved to {folder} ({time.time() - t0:.0f} s)")
    return folder


def evaluate(trainer, policy_params, n_batches: int = 4, seed: int = 1234, graphdef=None) -> dict:
    """Mean reward, KL to the reference (sum of k1 over tokens), valid share and samples on fixed prompts."""
    from rlhf_jax.run.data import tokenize_prompts

    prompts = reviews.sample_prompts(trainer.config.train.rollout_batch_size * n_batches, seed=seed)
    ids, mask, texts, _ = tokenize_prompts(prompts, trainer.tokenizer, trainer.config.data.max_prompt_len)
    b = trainer.config.train.rollout_batch_size
    rewards, kls, valid, samples = [], [], [], []
    for i in range(n_batches):
        p_ids, p_mask = jnp.asarray(ids[i * b:(i + 1) * b]), jnp.asarray(mask[i * b:(i + 1) * b])
        out = trainer.generate(policy_params, p_ids, p_mask, jax.random.PRNGKey(seed + i), graphdef=graphdef)
        kls.extend(trainer.kl_to_reference(p_ids, p_mask, out))
        responses, _, ended = trainer.decode_responses(out)
        batch_prompts = texts[i * b:(i + 1) * b]
        rewards.extend(reviews.sentiment_reward(batch_prompts, responses))
        valid.extend(valid_fraction(batch_prompts, responses, ended))
        if i == 0:
            samples = [f"{p} | {r}" for p, r in zip(batch_prompts[:5], responses[:5])]
    return {"reward": float(np.mean(rewards)), "kl": float(np.mean(kls)), "valid": float(np.mean(valid)),
            "samples": samples}


def plot_metrics(workdir: str, out: str | None = None) -> str:
    """PNG of reward, KL and validity per iteration from `workdir/metrics.jsonl`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    records = {r["step"]: r for r in records}  # a resumed run may repeat steps: keep the latest
    steps = sorted(records)
    panels = [("objective/scores", "mean reward"), ("objective/kl", "KL to the original model (nats per response)"),
              ("task/valid_frac", "share of valid reviews"), ("objective/kl_coef", "KL coefficient")]
    panels = [(k, t) for k, t in panels if k in records[steps[0]]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (key, title) in zip(np.atleast_1d(axes), panels):
        ax.plot(steps, [records[s][key] for s in steps], lw=1.8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = out or os.path.join(workdir, "metrics.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def run_demo(workdir: str, num_iterations: int | None = None, sft_steps: int = 300, overrides: dict | None = None,
             quiet: bool = False) -> dict:
    """Warm-up (cached), PPO, summary. Returns the before/after numbers."""
    from transformers import AutoTokenizer

    from rlhf_jax.run.loop import train

    t_start = time.time()
    os.makedirs(workdir, exist_ok=True)
    config = demo_config(workdir)
    for key, value in (overrides or {}).items():  # dotted config keys: "rl.kl_coef", "seed"
        set_key(config, key, value)
    if num_iterations:
        config.train.num_iterations = num_iterations
    config.logging.progress = not quiet
    tokenizer = AutoTokenizer.from_pretrained(reviews.build_tokenizer(os.path.join(workdir, "tokenizer")))
    warm_up(workdir, tokenizer, steps=sft_steps)
    print(f"[demo] PPO: {config.train.num_iterations} iterations of {config.train.rollout_batch_size} "
          f"responses, adaptive KL (target {config.rl.kl_target})")
    trainer, state, history = train(config, os.path.join(workdir, "ppo"),
                                    extra_metrics={"task/valid_frac": valid_fraction})
    before = evaluate(trainer, trainer.ref_params, graphdef=trainer.ref_graphdef)  # the original model
    after = evaluate(trainer, trainer.policy_params(state))
    plot = plot_metrics(os.path.join(workdir, "ppo"))
    summary = {"before": before, "after": after, "wall_time_s": time.time() - t_start,
               "iterations": int(state.step), "plot": plot}
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print("\n[demo] summary (128 fresh prompts, sampled at temperature 1)")
    print(f"{'':8s}{'reward':>10s}{'KL':>10s}{'valid':>10s}")
    for name, r in (("before", before), ("after", after)):
        print(f"{name:8s}{r['reward']:10.2f}{r['kl']:10.2f}{r['valid']:10.0%}")
    for name, r in (("before", before), ("after", after)):
        print(f"\n[demo] samples {name}:")
        for s in r["samples"]:
            print("   ", s)
    print(f"\n[demo] metrics: {workdir}/ppo/metrics.jsonl, TensorBoard: {workdir}/ppo/tensorboard, plot: {plot}")
    print(f"[demo] wall time {summary['wall_time_s']:.0f} s")
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--iterations", type=int, default=None, help="PPO iterations (default: the config's)")
    parser.add_argument("--kl_coef", type=float, default=None, help="initial KL coefficient")
    parser.add_argument("--fixed_kl", action="store_true", help="keep the KL coefficient fixed (no controller)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    overrides = {}
    if args.kl_coef is not None:
        overrides["rl.kl_coef"] = args.kl_coef
    if args.fixed_kl:
        overrides["rl.adaptive_kl"] = False
    run_demo(args.workdir, args.iterations, overrides=overrides)


if __name__ == "__main__":
    main()
