"""Process setup for CPU runs that has to happen before anything allocates."""

from __future__ import annotations

import os
import platform
import sys

_TUNABLE = "glibc.malloc.hugetlb=1"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


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
