"""PPO on a Llama-3.1-8B-shaped policy at real size: full fine-tuning, value head on the trunk,
f32 master weights and optimizer state, bf16 compute, FSDP over every chip, the blocks scanned
(`model.scan_layers`: the update compiles in about 40 s on a 2-core CPU host, against 259 s unrolled).

The architecture is Llama-3.1-8B's config values (random weights unless model.path names a
local folder with the real ones; llama3 RoPE scaling does not change memory or FLOPs and is left
out here). Check the fit first, without weights or a TPU:

    python -m rlhf_jax.plan --config=configs/llama3_8b_ppo.py --topology=v5e:4x4
"""

from rlhf_jax.config import base_config


def llama3_8b(c):
    c.model.builtin.update(family="llama", vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32,
                           num_kv_heads=8, intermediate_size=14336, max_position_embeddings=131072,
                           rope_theta=500000.0, norm_eps=1e-5, tie_word_embeddings=False)
    return c


def get_config():
    c = llama3_8b(base_config())
    c.model.update(dtype="bfloat16", param_dtype="float32", value_model="shared", remat="full", logits_chunk=128,
                   scan_layers=True)
    c.data.max_prompt_len = 512
    c.sampling.max_new_tokens = 512
    c.train.rollout_batch_size = 64
    c.rl.update(num_ppo_epochs=1, num_mini_batches=4)
    c.optim.learning_rate = 1e-6
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    return c
