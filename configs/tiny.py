"""A tiny random GPT-2-architecture policy with a Python reward: a smoke run in well under a minute.

    python -m rlhf_jax.train --config=configs/tiny.py --workdir=runs/tiny
"""

from rlhf_jax.config import base_config


def get_config():
    c = base_config()
    c.model.builtin.update(family="gpt2", hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=32)
    c.reward.function = "rlhf_jax.tasks.reviews:target_word_reward"
    c.data.max_prompt_len = 4
    c.sampling.max_new_tokens = 8
    c.train.rollout_batch_size = 16
    c.train.num_iterations = 6
    c.rl.num_ppo_epochs = 2
    c.rl.num_mini_batches = 2
    c.optim.learning_rate = 3e-3
    c.checkpoint.every = 3
    c.logging.samples_every = 3
    return c
