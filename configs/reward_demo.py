"""A reward model for the demo task, trained on synthetic preference pairs (chosen = more positive),
starting from the demo's warmed-up model (run `make demo` first).

    python -m rlhf_jax.train_reward --config=configs/reward_demo.py --workdir=runs/demo/rm
"""

from rlhf_jax.run.reward_model import base_reward_config


def get_config():
    c = base_reward_config()
    c.model.path = "runs/demo/sft_model"
    return c
