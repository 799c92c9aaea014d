"""LoRA PPO on SmolLM2-135M-Instruct (prepared offline by `make smollm2`)
with chat-templated questions and a reward for short answers that keep the key fact. The value head
sits on the policy's backbone; the reference is the base plus the fresh adapters (B = 0), i.e. the base.

    python -m rlhf_jax.train --config=configs/smollm2_lora_ppo.py --workdir=runs/smollm2_ppo
"""

from rlhf_jax.config import base_config


def get_config():
    c = base_config()
    c.model.path = "runs/smollm2"
    c.model.value_model = "shared"
    c.tokenizer.pad_token = "<|endoftext|>"  # its own pad token is <|im_end|>, the EOS
    c.lora.update(enabled=True, rank=8, alpha=16.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    c.reward.function = "rlhf_jax.tasks.qa:short_factual_reward"
    c.data.update(path="configs/smollm2_questions.jsonl", chat_template=True, max_prompt_len=40)
    c.sampling.update(max_new_tokens=24, temperature=0.7)
    c.train.update(rollout_batch_size=16, num_iterations=20)
    c.rl.update(kl_coef=0.05, num_ppo_epochs=2, num_mini_batches=2, vf_coef=0.1, missing_eos_penalty=0.5)
    c.optim.update(learning_rate=1e-4, warmup_steps=0)
    c.checkpoint.every = 10
    c.logging.samples_every = 5
    return c
