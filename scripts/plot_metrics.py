"""Plot reward, KL, validity (when logged) and the KL coefficient per iteration of a run.

    python scripts/plot_metrics.py WORKDIR [--out FILE.png]

WORKDIR is a training workdir (it holds metrics.jsonl), e.g. runs/demo/ppo.
"""

import argparse
import os

from rlhf_jax.run.cli import user_errors
from rlhf_jax.run.loading import check_path
from rlhf_jax.tasks.demo import plot_metrics


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    with user_errors():
        check_path("WORKDIR", args.workdir)
        check_path("WORKDIR", os.path.join(args.workdir, "metrics.jsonl"), "file")  # the demo's: runs/demo/ppo
        print(plot_metrics(args.workdir, args.out))


if __name__ == "__main__":
    main()
