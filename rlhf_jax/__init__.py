"""rlhf_jax: RLHF with KL-regularized PPO in JAX/Flax."""

__version__ = "0.1.0"
