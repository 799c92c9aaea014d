"""GRPO with LoRA on SmolLM2-135M-Instruct (prepared offline by `make smollm2`) on generated
arithmetic word problems, with a verifiable reward: 1 for a final line "Answer: N" with the right N.

    python -m rlhf_jax.train --config=configs/smollm2_lora_grpo.py --workdir=runs/smollm2_grpo
    python scripts/eval_arithmetic.py --model=runs/smollm2 --adapters=runs/smollm2_grpo/adapter

4 problems x 8 samples per iteration from `configs/arithmetic_train.jsonl` (each after one worked
example, `rlhf_jax.tasks.arithmetic.EXAMPLE`); the 300 problems of
`configs/arithmetic_heldout.jsonl` share no question with them (rlhf_jax.tasks.arithmetic.write_problems).
GRPO as DeepSeekMath's: group baseline scaled by the group's std, k3 KL in the loss, per-sequence
aggregation; no value model or head.
"""

from rlhf_jax.config import base_config


def get_config():
    c = base_config()
    c.algorithm = "grpo"
    c.model.path = "runs/smollm2"
    c.tokenizer.pad_token = "<|endoftext|>"  # its own pad token is <|im_end|>, the EOS
    c.lora.update(enabled=True, rank=16, alpha=32.0, targets=("q_proj", "k_proj", "v_proj", "o_proj",
                                                              "gate_proj", "up_proj", "down_proj"))
    c.reward.function = "rlhf_jax.tasks.arithmetic:exact_match_reward"
    c.data.update(path="configs/arithmetic_train.jsonl", chat_template=True, max_prompt_len=144)
    c.sampling.update(max_new_tokens=40, temperature=0.8)
    c.train.update(rollout_batch_size=32, num_generations=8, num_iterations=30)
    c.rl.update(kl_coef=0.02, kl_in_loss=True, kl_loss_estimator="k3", loss_aggregation="sequence",
                 num_ppo_epochs=1, num_mini_batches=2)
    c.optim.update(learning_rate=2e-4, warmup_steps=0)
    c.checkpoint.every = 10
    c.logging.samples_every = 5
    return c
