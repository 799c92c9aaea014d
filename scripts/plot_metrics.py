"""Plot reward, KL, validity (when logged) and the KL coefficient per iteration of a run.

    python scripts/plot_metrics.py WORKDIR [--out FILE.png]

WORKDIR is a training workdir (it holds metrics.jsonl), e.g. runs/demo/ppo.
"""

import argparse
import os

from rlhf_jax.tasks.demo import plot_metrics


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not os.path.exists(os.path.join(args.workdir, "metrics.jsonl")):
        parser.error(f"no metrics.jsonl in {args.workdir!r} (for the demo, pass runs/demo/ppo)")
    print(plot_metrics(args.workdir, args.out))


if __name__ == "__main__":
    main()
