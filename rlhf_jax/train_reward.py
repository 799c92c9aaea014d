"""Command line of reward-model training.

    python -m rlhf_jax.train_reward --config=configs/reward_demo.py --workdir=runs/rm
"""

from __future__ import annotations

import json


def _main(config, workdir):
    from rlhf_jax.run.reward_model import train_reward_model
    print(json.dumps(train_reward_model(config, workdir)))


def run():
    from rlhf_jax.run.cli import run_cli
    run_cli(_main, "Path to a reward-model config file.")


if __name__ == "__main__":
    run()
