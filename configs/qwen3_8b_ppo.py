"""PPO on a Qwen3-8B-shaped policy (random weights, or the real ones with --config.model.path), for the
planner: full fine-tuning with the value head on the trunk, f32 master weights, bf16 compute.

    python -m rlhf_jax.plan --config=configs/qwen3_8b_ppo.py --topology=v5e:4x4

The architecture is Qwen3-8B's config.json (36 layers, width 4096, 32 query and 8 key/value heads of
128, MLP 12288, vocabulary 151936, per-head query/key RMSNorm, untied head); the run is
`configs/llama3_8b_ppo.py`'s (batch 64 of 512 + 512 tokens, 4 minibatches, FSDP over all chips).
"""

import os

from rlhf_jax.config import load_config


def get_config():
    c = load_config(os.path.join(os.path.dirname(__file__), "llama3_8b_ppo.py"))
    c.model.builtin.update(family="llama", vocab_size=151936, hidden_size=4096, num_layers=36, num_heads=32,
                           num_kv_heads=8, intermediate_size=12288, max_position_embeddings=40960,
                           rope_theta=1000000.0, norm_eps=1e-6, tie_word_embeddings=False, qk_norm=True)
    return c
