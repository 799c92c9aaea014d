"""The planner's command line: exit 3 with the function named when it does not fit, one line and
exit 2 for a bad argument. (Its table and JSON on the local devices: tests/test_readme.py, which runs
the README's planner command.)"""

import json
import os
import subprocess
import sys

import pytest

from tests.common import ROOT


def _plan(*args):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "rlhf_jax.plan", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_plan_estimates_collectives_on_a_tpu_slice():
    pytest.importorskip("libtpu", reason="libtpu is not installed (pip install -e '.[tpu]'): no compile-only TPU")
    result = _plan("--config=configs/tiny.py", "--topology=v5e:2x4", "--config.mesh.data=1",
                   "--config.mesh.fsdp=-1")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["chip"]["peak_tflops"] == 197 and "measured_s" not in report["functions"]["update"]
    rollout, update = report["functions"]["rollout"], report["functions"]["update"]
    assert rollout["per_token_comm_mib"] > 0 and update["comm_gib"] > 0
    assert set(update["comm_gib_by_kind"]) <= {"all-gather", "all-reduce", "reduce-scatter", "all-to-all",
                                               "collective-permute"}
    assert 0 < report["iteration"]["est_mfu"] < 1


def test_plan_reports_what_does_not_fit_on_a_tpu_slice():
    pytest.importorskip("libtpu", reason="libtpu is not installed (pip install -e '.[tpu]'): no compile-only TPU")
    # A 1.7 B-parameter model with f32 Adam replicated on every chip (no FSDP) needs ~26 GiB per v5e chip.
    result = _plan("--config=configs/tiny.py", "--topology=v5e:2x2", "--only=update", "--config.mesh.data=4",
                   "--config.model.builtin.family=llama", "--config.model.builtin.num_layers=1",
                   "--config.model.builtin.hidden_size=8192", "--config.model.builtin.num_heads=64",
                   "--config.model.builtin.intermediate_size=16384", "--config.model.builtin.vocab_size=65536",
                   "--config.model.builtin.tie_word_embeddings=False")
    assert result.returncode == 3, result.stderr[-3000:]
    assert "does not fit: update needs" in result.stderr and "15.75 GiB available" in result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert not report["fits"] and not report["functions"]["update"]["fits"]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args,message", [
    (["--topology=v9z:2x2"], "--topology='v9z:2x2'"),
    (["--only=sample"], "--only=sample"),
    (["--topology=v5e:2x2", "--measure"], "--measure"),
    (["--config.model.remat=some"], "config.model.remat = 'some'"),
    (["--config.sampling.decode_segments=0"], "config.sampling.decode_segments = 0"),
    (["--config.model.attention=splash"], "config.model.attention = 'splash' is a TPU kernel"),
    (["--config.sampling.decode_layout=tensor", "--config.sampling.shard_cache=False"],
     "config.sampling.decode_layout = 'tensor' needs config.sampling.shard_cache = True"),
])
def test_plan_bad_arguments_are_one_line(args, message):
    result = _plan("--config=configs/tiny.py", *args)
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr and "Traceback" not in result.stderr


def test_plan_refuses_a_tensor_decode_layout_the_heads_do_not_fit_in_one_line():
    pytest.importorskip("libtpu", reason="libtpu is not installed (pip install -e '.[tpu]'): no compile-only TPU")
    result = _plan("--config=configs/tiny.py", "--topology=v5e:2x4", "--config.mesh.data=1", "--config.mesh.fsdp=-1",
                   "--config.sampling.decode_layout=tensor")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "config.sampling.decode_layout = 'tensor': 4 query heads do not split over 8" in result.stderr
    assert "Traceback" not in result.stderr


def test_plan_names_an_unsupported_model_folder_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", "vocab_size": 64, "use_sliding_window": True}))
    result = _plan("--config=configs/tiny.py", f"--config.model.path={tmp_path}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "use_sliding_window=True" in result.stderr and "Traceback" not in result.stderr


def test_plan_estimates_the_continuous_engine_from_its_schedule():
    """--engine_lengths: the engine's loops are its schedule for geometric lengths, each decode step
    priced as the static sampler's step at that many rows, and the prefill shared by the refills."""
    import numpy as np

    from rlhf_jax.plan.cli import geometric_lengths, plan
    from rlhf_jax.sampling.engine import schedule
    from tests import common

    lengths = geometric_lengths(4000, 100, 0.25)
    assert abs(lengths.mean() - 23.5) < 1.5 and lengths.max() == 100  # about a quarter, the tail cut
    config = common.config(sampling__max_new_tokens=28)
    result = plan(config, only=("rollout",), measure=False, engine_lengths=0.25)
    engine = result["engine"]
    expected = schedule(geometric_lengths(16, 28, 0.25), engine["slots"], engine["refill"], 2)
    assert [(loop["slots"], loop["steps"]) for loop in engine["loops"]] == expected == [(8, 10), (4, 9), (2, 9)]
    steps = [loop["decode_step_s"] for loop in engine["loops"]]
    assert steps == sorted(steps, reverse=True) and steps[-1] > 0  # fewer rows, cheaper steps
    assert np.isclose(engine["est_s"], engine["prefill_s"] + engine["decode_s"])
    assert np.isclose(engine["decode_s"], sum(loop["steps"] * loop["decode_step_s"] for loop in engine["loops"]))
    assert engine["static_est_s"] == result["functions"]["rollout"]["est_s"] > engine["est_s"]
    # The engine's own program, compiled: its memory, and each tail loop's trip, a decode step of k
    # slots doing the static decode step's matmuls for k of its 16 rows.
    program = engine["program"]
    assert program["fits"] and program["total_gib"] > 0 and program["sizes"] == [8, 4, 2]
    static_gflop = result["functions"]["rollout"]["per_token_gflop"]
    assert [step["slots"] for step in program["steps"]] == [4, 2]
    for step in program["steps"]:
        assert np.isclose(step["gflop"], static_gflop * step["slots"] / 16, rtol=1e-6)
