"""Process setup of the command-line entry points, before jax is imported and anything allocates."""

from __future__ import annotations

import os
import platform
import sys

_TUNABLE = "glibc.malloc.hugetlb=1"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


# Device nodes of the accelerators JAX can use: TPU (v4/v5e: accel, v5p/v6e: vfio), NVIDIA and AMD GPUs.
_ACCELERATOR_NODES = ("accel", "vfio", "nvidia", "kfd")


def cpu_only_without_accelerators(environ=os.environ, dev: str = "/dev") -> None:
    """Set JAX_PLATFORMS=cpu in `environ` when this machine has no accelerator device at all.

    With libtpu installed (the tpu and test extras) but no TPU chip, JAX's first call tries the TPU
    and prints a dozen lines of libtpu errors before it falls back to the CPU. Where no accelerator
    device node exists, the CPU is all JAX could use, so saying so changes nothing else. Leaves a
    JAX_PLATFORMS the user chose alone.
    """
    if "JAX_PLATFORMS" in environ or not os.path.isdir(dev):
        return
    if not any(name.startswith(_ACCELERATOR_NODES) for name in os.listdir(dev)):
        environ["JAX_PLATFORMS"] = "cpu"


def use_huge_pages() -> None:
    """Restart this process (same PID, same arguments) with glibc's malloc on transparent huge pages.

    XLA:CPU takes each execution's temporaries from freshly allocated memory, and with 4 KiB pages
    the first touch of every page faults: 400k faults in ten `generate` calls at the large benchmark
    size, a quarter of that with 2 MiB pages, and one PPO iteration there took 0.92x the time.
    (PyTorch's speed did not change with it.)

    Does nothing off Linux/glibc, when the kernel's transparent huge pages are off, when
    GLIBC_TUNABLES already chooses, or with RLHF_JAX_HUGE_PAGES=0. It replaces the running
    program, so only command-line entry points call it, first thing.
    """
    cpu_only_without_accelerators()  # every entry point calls this first thing, before jax is imported
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (os.environ.get("RLHF_JAX_HUGE_PAGES", "1") == "0" or sys.platform != "linux"
            or "glibc.malloc.hugetlb" in tunables or platform.libc_ver()[0] != "glibc"):
        return
    try:
        with open(_THP_MODE) as f:
            if "[never]" in f.read():
                return
    except OSError:
        return
    env = dict(os.environ, GLIBC_TUNABLES=":".join(t for t in (tunables, _TUNABLE) if t))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def initialize_distributed(mesh_config) -> None:
    """Join the other hosts' processes (`config.mesh.distributed`): `jax.distributed.initialize` with
    the config's coordinator address, process count and id, or JAX's cluster detection where they are
    unset. Call it before any other JAX call (it must come before the backend starts); a second call
    is a no-op."""
    import jax
    if jax.distributed.is_initialized():
        return
    m = mesh_config
    if m.coordinator_address:
        jax.distributed.initialize(m.coordinator_address, m.num_processes, m.process_id)
    else:
        jax.distributed.initialize()
