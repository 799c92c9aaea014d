"""Process setup of the command-line entry points, before jax is imported and anything allocates."""

from __future__ import annotations

import os
import platform
import sys

_HUGE_PAGES = "glibc.malloc.hugetlb=1"
# One heap that is never given back (no mmap'd chunks, no trimming): XLA:CPU then reuses the memory of
# the last execution's temporaries instead of faulting in fresh pages for every one.
_KEEP_FREED = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0", f"glibc.malloc.trim_threshold={2 ** 40}")
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


def malloc_tunables(environ=os.environ) -> str | None:
    """The GLIBC_TUNABLES that suit XLA:CPU's allocations, or None where nothing is to change: malloc on
    transparent huge pages and, where JAX runs on the CPU, keeping the memory it frees.

    XLA:CPU takes each execution's temporaries from freshly allocated memory. With 4 KiB pages the
    first touch of every page faults: 400k faults in ten `generate` calls at the large benchmark
    size, a quarter of that with 2 MiB pages, and one PPO iteration there took 0.92x the time. glibc
    still maps a large chunk afresh for each allocation and unmaps it when freed (about 800 page
    faults per large GRPO iteration); with one heap that is never trimmed, the next execution reuses
    it: no faults, and that iteration's update took 1.35 s instead of 1.35-1.60.
    (PyTorch's speed did not change with huge pages.) The process keeps its peak memory.

    None off Linux/glibc, when GLIBC_TUNABLES already chooses any malloc setting, or with
    RLHF_JAX_HUGE_PAGES=0; huge pages only where the kernel's transparent huge pages are on, the
    kept memory only with JAX_PLATFORMS=cpu.
    """
    tunables = environ.get("GLIBC_TUNABLES", "")
    if (environ.get("RLHF_JAX_HUGE_PAGES", "1") == "0" or sys.platform != "linux"
            or "glibc.malloc." in tunables or platform.libc_ver()[0] != "glibc"):
        return None
    added = []
    try:
        with open(_THP_MODE) as f:
            if "[never]" not in f.read():
                added.append(_HUGE_PAGES)
    except OSError:
        pass
    if environ.get("JAX_PLATFORMS") == "cpu":
        added.extend(_KEEP_FREED)
    return ":".join(([tunables] if tunables else []) + added) if added else None


def tune_process() -> None:
    """The process setup of a command-line entry point, first thing (before jax is imported): JAX on
    the CPU where the machine has no accelerator (`cpu_only_without_accelerators`), then glibc's
    malloc tuned for XLA:CPU (`malloc_tunables`), which takes effect only at a process's start: where
    it changes anything, this process is replaced by the same program (same PID, same arguments)
    with those tunables. So only command-line entry points call it."""
    cpu_only_without_accelerators()
    tunables = malloc_tunables()
    if tunables is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, dict(os.environ, GLIBC_TUNABLES=tunables))


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
