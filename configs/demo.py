"""The offline demo's PPO stage (the warm-up model must exist: run `make demo` or
`python -m rlhf_jax.tasks.demo` once first).

    python -m rlhf_jax.train --config=configs/demo.py --workdir=runs/demo/ppo
"""

from rlhf_jax.tasks.demo import demo_config


def get_config():
    return demo_config("runs/demo")
