"""A reward function that returns NaN, for the trainer's non-finite test."""


def reward(prompts, responses):
    return [float("nan")] * len(responses)
