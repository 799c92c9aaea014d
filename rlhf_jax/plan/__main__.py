from rlhf_jax.plan.cli import run

run()
