"""The newer surfaces answer a user's mistake with one line and exit 2 (exit 1 for a reward function
that returns the wrong kind of value), before any model loads: the planner, the reward-model
trainer, the scripts that take a path, a chat template the tokenizer lacks, an engine shape that does
not fit the rollout, a reward's contract."""

import os
import subprocess
import sys

import numpy as np
import pytest

from rlhf_jax.config import ConfigError
from rlhf_jax.run.loading import UserCodeError, check_path
from rlhf_jax.run.trainer import check_rewards
from tests.common import ROOT


def _run(args, tmp_path, module=True):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    cmd = [sys.executable, "-m", *args] if module else [sys.executable, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _one_line(result, status, message):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == status, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and message in lines[-1], result.stderr[-3000:]


@pytest.mark.parametrize("args,message", [
    (["rlhf_jax.plan", "--config=configs/no_such.py"], "--config=configs/no_such.py: no such config file"),
    (["rlhf_jax.train_reward", "--config=configs/reward_demo.py", "--workdir={tmp}/rm",
      "--config.model.path={tmp}/no_model"], "config.model.path = '{tmp}/no_model': no such folder"),
    (["scripts/eval_arithmetic.py", "--model={tmp}/no_model"], "--model = '{tmp}/no_model': no such folder"),
    (["scripts/eval_arithmetic.py", "--model={tmp}", "--problems=configs/arithmetic_heldout.jsonl"],
     "no config.json in '{tmp}'"),
    (["scripts/precision.py", "--config=configs/tiny.py", "--set", "model.path={tmp}/no_model"],
     "config.model.path = '{tmp}/no_model': no such folder"),
    (["scripts/precision.py", "--config=configs/nothing.py"], "--config=configs/nothing.py: no such config file"),
    (["scripts/plot_metrics.py", "{tmp}"], "WORKDIR = '{tmp}/metrics.jsonl': no such file"),
])
def test_entry_points_check_their_paths_in_one_line(tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = _run(args, tmp_path, module=not args[0].startswith("scripts/"))
    _one_line(result, 2, message.replace("{tmp}", str(tmp_path)))


def test_check_path_kinds(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    check_path("--a", str(tmp_path / "file.txt"), "file")
    check_path("--a", str(tmp_path))
    with pytest.raises(ConfigError, match="--a = .*file.txt': no such folder"):
        check_path("--a", str(tmp_path / "file.txt"))
    with pytest.raises(ConfigError, match="--tok = .*: no tokenizer in it"):
        check_path("--tok", str(tmp_path), "tokenizer")
    with pytest.raises(FileNotFoundError, match="no config.json"):  # exit 2 as well, named by the loader
        check_path("--model", str(tmp_path), "model")


def test_a_chat_template_the_tokenizer_lacks_is_one_line(tmp_path):
    # The built-in reviews tokenizer has no chat template.
    result = _run(["rlhf_jax.train", "--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}",
                   "--config.data.chat_template=True"], tmp_path)
    _one_line(result, 2, "config.data.chat_template = True: the tokenizer in ")
    assert "has no chat template" in result.stderr


def test_an_engine_shape_that_does_not_fit_is_one_line(tmp_path):
    result = _run(["rlhf_jax.train", "--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}",
                   "--config.sampling.engine=continuous", "--config.sampling.slots=6",
                   "--config.sampling.refill=3"], tmp_path)
    _one_line(result, 2, "config.sampling.slots = 6, refill = 3: 16 requests do not split into refills of 3")
    assert not (tmp_path / "w" / "checkpoints").exists()


@pytest.mark.parametrize("raw,message", [
    (["high", "low"], "it returned a str for response 0 ('high')"),
    ([1.0, "2.5"], "it returned a str for response 1 ('2.5')"),
    ([0.5, None], "it returned a NoneType for response 1 (None)"),
    ([[1.0], [2.0]], "it returned a list for response 0 ([1.0])"),
    ([1.0], "it returned 1 values for 2 responses"),
    (np.array([[1.0, 2.0]]), "an array of shape (1, 2)"),
    (np.array(["1", "2"]), "dtype <U1"),
    (3.0, "it returned a float (3.0), not a list of numbers"),
])
def test_a_reward_function_returns_one_real_number_per_response(raw, message):
    with pytest.raises(UserCodeError) as e:
        check_rewards(raw, 2, "user:reward")
    assert "config.reward.function = 'user:reward' must return one real number per response" in str(e.value)
    assert message in str(e.value)


def test_rewards_of_every_numeric_kind_are_accepted():
    for raw in ([1, 2.5], (np.float64(1.0), np.int32(2)), [True, False], np.array([1, 2], np.int64),
                np.array([0.5, 1.5], np.float32)):
        np.testing.assert_array_equal(check_rewards(raw, 2, "user:reward"), np.asarray(raw, np.float32))


def test_a_reward_of_the_wrong_kind_stops_the_command_line_with_one_line(tmp_path):
    (tmp_path / "user_reward.py").write_text("def reward(prompts, responses):\n    return ['high'] * len(prompts)\n")
    result = _run(["rlhf_jax.train", "--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}",
                   "--config.train.num_iterations=1", "--config.logging.progress=False",
                   "--config.reward.function=user_reward:reward"], tmp_path)
    _one_line(result, 1, "config.reward.function = 'user_reward:reward' must return one real number per response; "
                         "it returned a str for response 0 ('high')")
