"""A small factual-QA task for real chat models: short answers that still state the key fact.

`configs/smollm2_questions.jsonl` holds the questions (written by `write_questions`); the reward
finds each prompt's question, then scores the response: +1 when it contains the key fact, minus
0.02 per word, so a short correct answer scores highest and padding costs.
"""

from __future__ import annotations

import json

FACTS = {
    "What is the capital of France?": "Paris",
    "What is the capital of Japan?": "Tokyo",
    "What is the capital of Italy?": "Rome",
    "What is the capital of Germany?": "Berlin",
    "What is the capital of Spain?": "Madrid",
    "What is the capital of the United Kingdom?": "London",
    "What is the capital of Egypt?": "Cairo",
    "What is the capital of Russia?": "Moscow",
    "What is the largest planet in the solar system?": "Jupiter",
    "What is the closest star to the Earth?": "Sun",
    "How many legs does a spider have?": "eight",
    "How many days are in a week?": "seven",
    "What color is the sky on a clear day?": "blue",
    "What do bees make?": "honey",
    "What is frozen water called?": "ice",
    "What gas do plants absorb from the air?": "carbon dioxide",
}


def write_questions(path: str) -> None:
    with open(path, "w") as f:
        for question in FACTS:
            f.write(json.dumps({"prompt": question}) + "\n")


def short_factual_reward(prompts: list[str], responses: list[str]) -> list[float]:
    scores = []
    for prompt, response in zip(prompts, responses):
        fact = next((f for q, f in FACTS.items() if q in prompt), None)
        if fact is None:
            raise KeyError(f"no known question in prompt {prompt[-80:]!r}")
        has_fact = fact.lower() in response.lower()
        scores.append(float(has_fact) - 0.02 * len(response.split()))
    return scores
