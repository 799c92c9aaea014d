"""The verifiable arithmetic task: generated answers, the strict answer parser, disjoint splits."""

import json
import os

import numpy as np
import pytest

from rlhf_jax.tasks import arithmetic
from tests.common import ROOT

CONFIGS = os.path.join(ROOT, "configs")


def test_the_reward_rederives_every_generated_answer():
    rng = np.random.default_rng(1)
    for _ in range(500):
        text, answer = arithmetic.problem(rng)
        assert answer >= 0 and arithmetic.solve(text) == answer
        # The worked example's problem comes first: the reward answers the last one.
        example = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in arithmetic.EXAMPLE)
        chat = f"{example}<|im_start|>user\n{text} {arithmetic.INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
        assert arithmetic.exact_match_reward([chat], [f"Let me see.\nAnswer: {answer}"]) == [1.0]
        assert arithmetic.exact_match_reward([chat], [f"Answer: {answer + 1}"]) == [0.0]


@pytest.mark.parametrize("response,parsed", [
    ("Answer: 12", 12), ("14 - 2 = 12\nAnswer: 12.", 12), ("  Answer: -3 \n\n", -3),
    ("The answer is 12", None), ("Answer: 12 apples", None), ("answer: 12", None), ("Answer: 1,200", None),
    ("Answer: 12\nThat was easy.", None), ("Answer:12", None), ("", None),
])
def test_the_answer_parser_is_strict(response, parsed):
    assert arithmetic.parse_answer(response) == parsed


def test_a_prompt_without_a_problem_is_an_error():
    with pytest.raises(KeyError, match="no arithmetic problem"):
        arithmetic.exact_match_reward(["What is the capital of France?"], ["Answer: 1"])


def test_the_shipped_splits_share_no_question():
    def questions(name):
        prompts = [json.loads(line)["prompt"] for line in open(os.path.join(CONFIGS, name))]
        assert all(p[:-1] == arithmetic.EXAMPLE and p[-1]["role"] == "user" for p in prompts)
        return [p[-1]["content"] for p in prompts]
    train, heldout = questions("arithmetic_train.jsonl"), questions("arithmetic_heldout.jsonl")
    assert len(train) == 2000 and len(heldout) == 300 and not set(train) & set(heldout)
    assert len(set(train)) == len(train) and all(q.endswith(arithmetic.INSTRUCTION) for q in train + heldout)
    assert arithmetic.EXAMPLE[0]["content"] not in train + heldout


def test_write_problems_is_deterministic(tmp_path):
    paths = [str(tmp_path / n) for n in ("a", "b", "c", "d")]
    arithmetic.write_problems(*paths[:2], n_train=50, n_heldout=20, seed=3)
    arithmetic.write_problems(*paths[2:], n_train=50, n_heldout=20, seed=3)
    assert open(paths[0]).read() == open(paths[2]).read() and open(paths[1]).read() == open(paths[3]).read()
