"""tune_process: the command-line entry points restart once with glibc's malloc tunables."""

import os
import platform
import subprocess
import sys

import pytest

from tests.common import ROOT

SHOW = ("import os; from rlhf_jax.run.runtime import tune_process; print('start', flush=True); tune_process(); "
        "print('tunables', os.environ.get('GLIBC_TUNABLES', ''))")


KEEP_FREED = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776"


def _run(**env):
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "RLHF_JAX_HUGE_PAGES", "JAX_PLATFORMS")}
    env.setdefault("JAX_PLATFORMS", "cpu")
    out = subprocess.run([sys.executable, "-c", SHOW], env={**base, "PYTHONPATH": ROOT, **env},
                         capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.split("\n")


def test_restarts_once_with_the_tunable_and_keeps_the_others():
    thp = "/sys/kernel/mm/transparent_hugepage/enabled"
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or not os.path.exists(thp) \
            or "[never]" in open(thp).read():
        pytest.skip("needs Linux, glibc and transparent huge pages")
    lines = _run()
    assert lines[:2] == ["start", "start"]  # the first process was replaced by a second one
    assert lines[2].split(" ")[1] == "glibc.malloc.hugetlb=1:" + KEEP_FREED
    # Freed memory is kept only for the CPU backend; other tunables are kept as they are.
    assert _run(JAX_PLATFORMS="tpu")[2].split(" ")[1] == "glibc.malloc.hugetlb=1"
    assert _run(GLIBC_TUNABLES="glibc.rtld.nns=2")[2].split(" ")[1] == \
        "glibc.rtld.nns=2:glibc.malloc.hugetlb=1:" + KEEP_FREED


def test_opting_out_or_choosing_already_leaves_the_process_alone():
    for env in ({"RLHF_JAX_HUGE_PAGES": "0"}, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},
                {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}):
        lines = _run(**env)
        assert lines[0] == "start" and not lines[1].startswith("start")  # not restarted
        assert lines[1].split(" ")[1] == env.get("GLIBC_TUNABLES", "")


def test_cpu_only_where_no_accelerator_device_exists(tmp_path):
    from rlhf_jax.run.runtime import cpu_only_without_accelerators
    (tmp_path / "null").touch()
    env = {}
    cpu_only_without_accelerators(env, dev=str(tmp_path))
    assert env == {"JAX_PLATFORMS": "cpu"}
    env = {"JAX_PLATFORMS": "tpu"}
    cpu_only_without_accelerators(env, dev=str(tmp_path))
    assert env == {"JAX_PLATFORMS": "tpu"}  # the user's choice stands
    for node in ("accel0", "nvidia0"):
        (tmp_path / node).touch()
        env = {}
        cpu_only_without_accelerators(env, dev=str(tmp_path))
        assert env == {}
        (tmp_path / node).unlink()
