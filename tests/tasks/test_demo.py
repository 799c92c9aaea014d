"""A shortened demo run: the reward rises clearly, the KL stays bounded, most reviews stay valid."""

import json
import os
import shutil

from rlhf_jax.tasks import reviews
from rlhf_jax.tasks.demo import run_demo


def test_grammar_checker_and_reward():
    import numpy as np
    rng = np.random.default_rng(0)
    samples = [reviews.sample_review(rng) for _ in range(500)]
    assert all(reviews.is_valid(s) for s in samples)
    assert not reviews.is_valid("the movie is great great .")
    assert not reviews.is_valid("great great great")
    assert not reviews.is_valid("the movie is")
    assert reviews.sentiment("the movie is great and fun , but the plot was dull .") == 1.0
    assert reviews.sentiment("great great great great") == 4.0  # hackable on purpose


def test_tokenizer_loads_with_autotokenizer(tmp_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(reviews.build_tokenizer(str(tmp_path / "tok")))
    assert tok.pad_token_id != tok.eos_token_id
    ids = tok("the movie is great .", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == "the movie is great ."


def test_short_demo_learns_within_the_kl_budget(tmp_path, demo_workdir, capsys):
    shutil.copytree(demo_workdir / "sft_model", tmp_path / "sft_model")  # the warm-up is cached
    cached = (tmp_path / "sft_model" / "model.safetensors").read_bytes()
    # 30 iterations instead of 80: a more cautious starting coefficient, since the adaptive
    # controller has less time to catch up (the full demo starts at 0.2).
    summary = run_demo(str(tmp_path), num_iterations=30, quiet=True, overrides={"rl.kl_coef": 0.5})
    before, after = summary["before"], summary["after"]
    assert before["valid"] > 0.8, before  # the warm-up model writes mostly valid reviews
    assert after["reward"] > before["reward"] + 1.0, (before, after)
    assert after["kl"] < 12.0, after
    # Measured over seeds 0-2: 56-72% valid after 30 iterations (KL 2.9-5.5); since the decode step's
    # attention rounds differently (2026-12-07), 46% here and 48-70% (KL 4.6-6.8) over seeds 0-2 from
    # the full demo's warm-up. Without the KL penalty the policy ends at 0% valid
    # (scripts/kl_sweep.py), so a third is a clear line.
    assert after["valid"] > 1 / 3, after
    assert os.path.exists(tmp_path / "ppo" / "metrics.png")
    assert json.load(open(tmp_path / "summary.json"))["iterations"] == 30
    # A workdir that holds the original model skips the warm-up: nothing trained, the weights as they were.
    out = capsys.readouterr().out
    assert f"original model: cached in {tmp_path / 'sft_model'}" in out and "warm-up step" not in out
    assert (tmp_path / "sft_model" / "model.safetensors").read_bytes() == cached
