"""Reward functions for the multi-process tests: one that fails on process 1 only, and one that
sleeps so that a signal can land mid-run."""

import time

import jax

from rlhf_jax.tasks.reviews import target_word_reward


def fail_on_process_1(prompts, responses):
    if jax.process_index() == 1:
        raise ValueError("reward service unreachable from process 1")
    return target_word_reward(prompts, responses)


def slow(prompts, responses):
    time.sleep(1.0)
    return target_word_reward(prompts, responses)
