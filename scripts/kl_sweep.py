"""The KL penalty's trade-off on the demo task: PPO with a fixed KL coefficient of 0, the demo's
default, and a large value; then reward against KL and validity for the three.

    python scripts/kl_sweep.py --workdir runs/kl_sweep [--coefs 0 0.2 1.0] [--iterations 80]

Reuses (or makes) the demo's warmed-up model in --demo_workdir. Prints one JSON line per run and
writes kl_sweep.json and kl_sweep.png to --workdir.
"""

if __name__ == "__main__":  # it may restart the process, so before the heavy imports below
    from rlhf_jax.run.runtime import tune_process
    tune_process()

import argparse
import json
import logging
import os

from rlhf_jax.tasks import reviews
from rlhf_jax.tasks.demo import demo_config, evaluate, valid_fraction, warm_up


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/kl_sweep")
    parser.add_argument("--demo_workdir", default="runs/demo")
    parser.add_argument("--coefs", type=float, nargs="+", default=[0.0, 0.2, 1.0])
    parser.add_argument("--iterations", type=int, default=80)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from transformers import AutoTokenizer

    from rlhf_jax.run.loop import train

    tokenizer = AutoTokenizer.from_pretrained(reviews.build_tokenizer(os.path.join(args.demo_workdir, "tokenizer")))
    warm_up(args.demo_workdir, tokenizer)
    results = []
    for coef in args.coefs:
        config = demo_config(args.demo_workdir)
        config.rl.kl_coef = coef
        config.rl.adaptive_kl = False  # a fixed coefficient isolates its effect
        config.train.num_iterations = args.iterations
        config.logging.progress = False
        run_dir = os.path.join(args.workdir, f"kl_coef_{coef:g}")
        trainer, state, history = train(config, run_dir, extra_metrics={"task/valid_frac": valid_fraction})
        final = evaluate(trainer, trainer.policy_params(state))
        result = {"kl_coef": coef, "reward": final["reward"], "kl": final["kl"], "valid": final["valid"],
                  "samples": final["samples"][:3], "history": [
                      {k: m[k] for k in ("objective/scores", "objective/kl", "task/valid_frac")} for m in history]}
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "history"}))
    with open(os.path.join(args.workdir, "kl_sweep.json"), "w") as f:
        json.dump(results, f, indent=2)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for r in results:
        label = f"kl_coef={r['kl_coef']:g}"
        axes[0].plot([h["objective/scores"] for h in r["history"]], label=label)
        axes[1].plot([h["objective/kl"] for h in r["history"]], label=label)
        axes[2].scatter(r["kl"], r["reward"], s=60, label=f"{label}: {r['valid']:.0%} valid")
    axes[0].set(title="mean reward per iteration", xlabel="PPO iteration")
    axes[1].set(title="KL to the original model (nats)", xlabel="PPO iteration")
    axes[2].set(title="final policy: reward against KL", xlabel="KL (nats)", ylabel="reward")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = os.path.join(args.workdir, "kl_sweep.png")
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
