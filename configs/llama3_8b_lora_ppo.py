"""LoRA PPO on a Llama-3.1-8B-shaped policy: rank 16 on q/k/v/o and the MLP, the base frozen in bf16
(held once: it is also the reference, with a snapshot of the fresh adapters, B = 0), value head on the trunk.

    python -m rlhf_jax.plan --config=configs/llama3_8b_lora_ppo.py --topology=v5e:2x2
"""

import os

from rlhf_jax.config import load_config


def get_config():
    c = load_config(os.path.join(os.path.dirname(__file__), "llama3_8b_ppo.py"))
    c.model.update(dtype="bfloat16", param_dtype="bfloat16")
    c.lora.update(enabled=True, rank=16, alpha=32.0,
                  targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    c.optim.learning_rate = 1e-5
    return c
