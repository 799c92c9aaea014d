"""The PPO trainer end to end: learning, exact resume, preemption, config errors, ratio 1."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from rlhf_jax.config import ConfigError
from rlhf_jax.run.loop import train
from rlhf_jax.run.trainer import RLTrainer
from tests import common
from tests.common import ROOT


def tiny_config(**overrides):
    defaults = dict(logging__progress=False, logging__tensorboard=False, checkpoint__every=0,
                    checkpoint__async_save=False)
    return common.config(**{**defaults, **overrides})


def test_tiny_run_raises_reward_with_bounded_kl(tmp_path):
    config = tiny_config(train__num_iterations=30, train__rollout_batch_size=32)
    _, _, history = train(config, str(tmp_path))
    scores = [m["objective/scores"] for m in history]
    kls = [m["objective/kl"] for m in history]
    start, end = np.mean(scores[:5]), np.mean(scores[-5:])
    assert end > start + 0.1, (start, end)
    assert max(kls) < 15.0, kls
    assert all(m["nonfinite_steps"] == 0 for m in history)
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert len(records) == 30 and "policy/clipfrac_avg" in records[0]
    assert os.path.getsize(tmp_path / "samples.jsonl") > 0


def test_first_minibatch_ratio_is_one(tmp_path):
    config = tiny_config(rl__num_ppo_epochs=1, rl__num_mini_batches=1, train__rollout_batch_size=16)
    config.sampling.temperature = 0.7  # the training forward must divide by the same temperature
    trainer = RLTrainer(config, str(tmp_path))
    state = trainer.init_state()
    # Before any update the policy is the reference: its samples' KL is 0 up to cache arithmetic.
    prompt_ids, prompt_mask = (trainer.to_device_batch(x[:16]) for x in (trainer.prompt_ids, trainer.prompt_mask))
    out = trainer.generate(trainer.policy_params(state), prompt_ids, prompt_mask, jax.random.PRNGKey(0))
    kl = trainer.kl_to_reference(prompt_ids, prompt_mask, out)
    assert kl.shape == (16,) and np.abs(kl).max() < 1e-4, kl
    _, metrics, _ = trainer.iteration(state)
    assert abs(metrics["val/ratio"] - 1.0) < 1e-5
    assert metrics["val/ratio_var"] < 1e-10
    assert metrics["policy/approxkl_avg"] < 1e-10
    assert metrics["policy/clipfrac_avg"] == 0.0


def test_resume_continues_exactly(tmp_path):
    config = tiny_config(train__num_iterations=4)
    _, straight, _ = train(config, str(tmp_path / "a"))
    _, first_half, _ = train(config, str(tmp_path / "b"), num_iterations=2)
    assert int(first_half.step) == 2
    _, resumed, history = train(config, str(tmp_path / "b"))
    assert int(resumed.step) == 4 and len(history) == 2
    for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(straight.key), np.asarray(resumed.key))


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path):
    config = tiny_config(train__num_iterations=4, checkpoint__every=2)
    train(config, str(tmp_path), num_iterations=4)
    ckpt = tmp_path / "checkpoints"
    assert sorted(os.listdir(ckpt)) == ["2", "4"]
    for root, _, files in os.walk(ckpt / "4" / "state"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    config.train.num_iterations = 5
    _, state, history = train(config, str(tmp_path))
    assert int(state.step) == 5 and len(history) == 3  # resumed from 2
    leftovers = os.listdir(ckpt)
    assert any(name.startswith("4.corrupt-") for name in leftovers), leftovers


def test_data_that_disagrees_with_its_saved_checksums_is_set_aside(tmp_path, caplog, monkeypatch):
    """Checkpoint 4's checksums are those of its state with one mantissa bit flipped: the disagreement
    a silent one-bit flip in the file leaves (readable, finite), which only the checksums can see.
    (Flipping a byte of the file itself is not deterministic: the zarr chunks are compressed and
    written in any order, so the byte lands unreadable, non-finite or silent from run to run.)"""
    from rlhf_jax.run import checkpoint
    real_save, real_fingerprint = checkpoint.Checkpointer.save, checkpoint.fingerprint

    def one_bit_off(tree):
        leaves, treedef = jax.tree.flatten(tree)
        i = max((j for j, x in enumerate(leaves) if x.dtype == np.float32), key=lambda j: leaves[j].size)
        words = jax.lax.bitcast_convert_type(leaves[i], np.uint32)
        leaves[i] = jax.lax.bitcast_convert_type(words.at[(0,) * words.ndim].add(1), np.float32)
        assert np.isfinite(np.asarray(leaves[i])).all()
        return real_fingerprint(jax.tree.unflatten(treedef, leaves))

    def save(self, step, state, meta):
        monkeypatch.setattr(checkpoint, "fingerprint", one_bit_off if step == 4 else real_fingerprint)
        real_save(self, step, state, meta)
        monkeypatch.setattr(checkpoint, "fingerprint", real_fingerprint)

    monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
    config = tiny_config(train__num_iterations=4, checkpoint__every=2)
    train(config, str(tmp_path), num_iterations=4)
    monkeypatch.setattr(checkpoint.Checkpointer, "save", real_save)
    config.train.num_iterations = 5
    with caplog.at_level("WARNING", logger="rlhf_jax.run.checkpoint"):
        _, state, history = train(config, str(tmp_path))
    assert int(state.step) == 5 and len(history) == 3  # resumed from 2
    assert "does not match the checksums saved with it" in caplog.text
    assert any(name.startswith("4.corrupt-") for name in os.listdir(tmp_path / "checkpoints"))


def _cli(args, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "rlhf_jax.train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, **kw)


def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path):
    workdir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_jax.train", "--config=configs/tiny.py",
                             f"--workdir={workdir}", "--config.train.num_iterations=100000",
                             "--config.logging.progress=False"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    steps = [int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()]
    assert steps, "no checkpoint after SIGTERM"
    saved = max(steps)
    config = tiny_config(train__num_iterations=saved + 1)
    _, state, history = train(config, str(workdir))
    assert int(state.step) == saved + 1 and len(history) == 1


@pytest.mark.parametrize("override,message", [
    ("--config.rl.kl_coeff=0.1", "kl_coeff"),
    ("--config.rl.kl_coef=lots", "kl_coef"),
    ("--config.rl.num_mini_batches=3", "does not divide into config.rl.num_mini_batches = 3"),
    ("--config.sampling.max_new_tokens=100", "exceeds the model's 32 positions"),
    ("--config.rl.kl_estimator=k4", "config.rl.kl_estimator = 'k4'"),
    ("--config.model.builtin.vocab_size=10", "vocab_size = 10 is smaller than the tokenizer's"),
    ("--config.model.logits_chunk=3", "config.model.logits_chunk = 3 does not divide"),
    ("--config.mesh.num_processes=2", "coordinator_address, num_processes and process_id go together"),
    ("--config.rl.sampler_correction=token", "config.rl.sampler_correction = 'token'"),
])
def test_config_errors_through_the_command_line(tmp_path, override, message):
    result = _cli(["--config=configs/tiny.py", f"--workdir={tmp_path}", override])
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "checkpoints").exists()


@pytest.fixture(scope="module")
def bad_tokenizers(tmp_path_factory):
    from transformers import AutoTokenizer

    from rlhf_jax.tasks.reviews import build_tokenizer
    root = tmp_path_factory.mktemp("tok")
    good = AutoTokenizer.from_pretrained(build_tokenizer(str(root / "good")))
    folders = {}
    for name, change in [("pad_is_eos", {"pad_token": good.eos_token}), ("no_pad", {"pad_token": None})]:
        tok = AutoTokenizer.from_pretrained(str(root / "good"))
        for attr, value in change.items():
            setattr(tok, attr, value)
        tok.save_pretrained(str(root / name))
        folders[name] = str(root / name)
    return folders


@pytest.mark.parametrize("name,message", [("pad_is_eos", "pad token is its EOS token"), ("no_pad", "no pad token")])
def test_tokenizer_errors(bad_tokenizers, tmp_path, name, message):
    config = tiny_config()
    config.tokenizer.path = bad_tokenizers[name]
    with pytest.raises(ConfigError, match=message):
        RLTrainer(config, str(tmp_path))
    result = _cli(["--config=configs/tiny.py", f"--workdir={tmp_path}", f"--config.tokenizer.path={bad_tokenizers[name]}"])
    assert result.returncode == 2 and message in result.stderr


def test_non_finite_reward_names_the_iteration(tmp_path):
    config = tiny_config()
    config.reward.function = "tests.nan_reward:reward"
    sys.path.insert(0, ROOT)
    with pytest.raises(FloatingPointError, match=r"iteration 0: non-finite reward"):
        train(config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists() or not os.listdir(tmp_path / "checkpoints")


def test_pad_token_override_and_qa_reward(tmp_path):
    from rlhf_jax.run.loading import load_tokenizer
    from rlhf_jax.tasks.qa import short_factual_reward
    config = tiny_config()
    config.tokenizer.pad_token = "<unk>"
    assert load_tokenizer(config, str(tmp_path)).pad_token_id == 2
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    scores = short_factual_reward([prompt] * 3, ["Paris.", "The capital of France is Paris.", "Lyon."])
    np.testing.assert_allclose(scores, [1 - 0.02, 1 - 0.12, -0.02], atol=1e-9)
    with pytest.raises(KeyError, match="no known question"):
        short_factual_reward(["what?"], ["x"])


def test_changed_model_size_stops_and_leaves_checkpoints_untouched(tmp_path):
    from rlhf_jax.run.checkpoint import CheckpointMismatch
    config = tiny_config(train__num_iterations=2, checkpoint__every=2)
    train(config, str(tmp_path))
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    wider = tiny_config(train__num_iterations=3, checkpoint__every=2)
    wider.model.builtin.hidden_size = 64
    with pytest.raises(CheckpointMismatch, match=r"\(params/policy/backbone/embed is float32\[\d+, 32\] there and "
                                                 r"float32\[\d+, 64\] here\)"):
        train(wider, str(tmp_path))
    scanned = tiny_config(train__num_iterations=3, checkpoint__every=2)
    scanned.model.scan_layers = True
    with pytest.raises(CheckpointMismatch, match="model.scan_layers must be what it was"):
        train(scanned, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before
    result = _cli(["--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.model.builtin.hidden_size=64",
                   "--config.logging.progress=False"])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "was written by a run with another model or state layout" in result.stderr
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before
    config.train.num_iterations = 3
    _, state, history = train(config, str(tmp_path))  # the config that wrote it resumes it
    assert int(state.step) == 3 and len(history) == 1
