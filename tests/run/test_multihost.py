"""The command line as 2 processes x 2 CPU devices (jax.distributed on 127.0.0.1) against 1 process x
4 devices, with packed updates: equal metrics, one metrics.jsonl, SIGTERM on one host stopping both
after the same iteration and an exact resume, and a reward that fails on one host ending both, not
hanging."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.common import ROOT

BASE = ["--config=configs/tiny.py", "--config.logging.progress=False", "--config.checkpoint.every=0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(workdir, devices: int, *args, process_id=None, port=None, log=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "rlhf_jax.train", *BASE, f"--workdir={workdir}", *args]
    if process_id is not None:
        cmd += ["--config.mesh.distributed=True", f"--config.mesh.coordinator_address=127.0.0.1:{port}",
                "--config.mesh.num_processes=2", f"--config.mesh.process_id={process_id}"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture
def launcher(tmp_path):
    """Starts processes and kills every one of them (and their children) at the end, passed or not."""
    started = []

    def launch(workdir, devices, *args, two_hosts=False):
        if not two_hosts:
            started.append(start(workdir, devices, *args, log=open(f"{workdir}.log", "w")))
            return started[-1:]
        port = free_port()
        procs = [start(workdir, devices, *args, process_id=i, port=port, log=open(f"{workdir}.p{i}.log", "w"))
                 for i in range(2)]
        started.extend(procs)
        return procs

    yield launch
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_all(procs, timeout=120):
    deadline = time.time() + timeout
    return [proc.wait(timeout=max(deadline - time.time(), 1)) for proc in procs]


def metrics(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def assert_same_metrics(a, b):
    assert [row["step"] for row in a] == [row["step"] for row in b]
    for x, y in zip(a, b):
        for key, value in x.items():
            if key.startswith(("time/", "speed/")):
                continue
            assert value == pytest.approx(y[key], rel=1e-5, abs=1e-6), (x["step"], key, value, y[key])


def test_two_processes_train_resume_and_fail_together(tmp_path, launcher):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    # Packed updates: each host lays out the whole batch (gathered), the same way.
    iterations = ["--config.train.num_iterations=5", "--config.train.pack_tokens=12", "--config.train.micro_rows=1"]
    single = launcher(one, 4, *iterations)
    # The slow reward (1 s) lets SIGTERM land mid-run; it scores like the default reward.
    pair = launcher(two, 2, *iterations, "--config.reward.function=tests.host_rewards:slow", two_hosts=True)
    metrics_file = os.path.join(two, "metrics.jsonl")
    deadline = time.time() + 90
    while not (os.path.exists(metrics_file) and os.path.getsize(metrics_file)) and time.time() < deadline:
        time.sleep(0.2)
    pair[1].send_signal(signal.SIGTERM)  # one host only
    assert wait_all(pair) == [0, 0], open(f"{two}.p0.log").read()[-3000:] + open(f"{two}.p1.log").read()[-3000:]
    stopped = metrics(two)
    assert 1 <= len(stopped) < 5
    saved = sorted(os.listdir(os.path.join(two, "checkpoints")))
    assert saved == [str(len(stopped))], saved  # both hosts saved the same step, together

    pair = launcher(two, 2, *iterations, "--config.reward.function=tests.host_rewards:slow", two_hosts=True)
    assert wait_all(pair + single) == [0, 0, 0]
    assert_same_metrics(metrics(two), metrics(one))  # one metrics.jsonl, every host's rows in it

    # A reward that raises on process 1 only: both end within seconds, each saying what happened.
    failing = str(tmp_path / "failing")
    t0 = time.time()
    pair = launcher(failing, 2, *iterations, "--config.reward.function=tests.host_rewards:fail_on_process_1",
                    two_hosts=True)
    codes = wait_all(pair, timeout=60)
    assert all(code != 0 for code in codes), codes
    assert time.time() - t0 < 60
    assert "ValueError: reward service unreachable from process 1" in open(f"{failing}.p1.log").read()
    assert "another process failed in its reward step" in open(f"{failing}.p0.log").read()
