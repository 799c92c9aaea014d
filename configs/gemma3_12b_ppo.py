"""PPO on a Gemma-3-12B-shaped policy (random weights, or the real ones with --config.model.path), for the
planner: full fine-tuning with the value head on the trunk, f32 master weights, bf16 compute.

    python -m rlhf_jax.plan --config=configs/gemma3_12b_ppo.py --topology=v5p:2x2x2

The architecture is Gemma-3-12B's text config.json (48 layers, width 3840, 16 query and 8 key/value heads
of 256, MLP 15360, vocabulary 262208 tied to the embeddings, five of every six layers attending to the
last 1024 positions; its linear RoPE scaling changes neither memory nor FLOPs and is left out); the run
is `configs/llama3_8b_ppo.py`'s (batch 64 of 512 + 512 tokens, 4 minibatches, FSDP over all chips).
"""

import os

from rlhf_jax.config import load_config


def get_config():
    c = load_config(os.path.join(os.path.dirname(__file__), "llama3_8b_ppo.py"))
    c.model.builtin.update(family="gemma3", vocab_size=262208, hidden_size=3840, num_layers=48, num_heads=16,
                           num_kv_heads=8, head_dim=256, intermediate_size=15360, max_position_embeddings=131072,
                           rope_theta=1000000.0, norm_eps=1e-6, tie_word_embeddings=True, sliding_window=1024)
    return c
