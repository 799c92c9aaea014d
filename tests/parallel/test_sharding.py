"""Sharded runs against single-device runs, on a simulated 8-device CPU mesh (in a subprocess,
since the device count is fixed when jax starts)."""

import os
import subprocess
import sys

from tests.common import ROOT


def test_sharded_checks_pass_on_8_simulated_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             os.path.join(ROOT, "tests", "parallel", "sharded_checks.py")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    print(result.stdout[-5000:])
    # A crash's first lines say what crashed (the faulthandler's stack follows them).
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[:3000] + result.stderr[-2000:]
    assert "skipped" not in result.stdout.splitlines()[-1], result.stdout[-500:]
