"""The shared command-line plumbing of the trainers and the planner: absl flags, and a config file with
dotted overrides (`--config=path --config.rl.kl_coef=0.1`) loaded by `rlhf_jax.config.load_config`."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Callable


@contextlib.contextmanager
def user_errors():
    """Mistakes a user can fix (a config value, a path, a model folder) print one line and exit 2; a
    reward function that returned the wrong kind of value prints one line and exits 1. Every command
    line, the scripts' included, runs its work under this; other exceptions keep their traceback."""
    from rlhf_jax.config import ConfigError
    from rlhf_jax.models.hf import CheckpointError
    from rlhf_jax.run.loading import UserCodeError
    try:
        yield
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except UserCodeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def split_config_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv without the config overrides, the overrides as "key=value"): `--config.key=value` and
    `--config.key value` are taken out before absl parses the rest (it knows only --config)."""
    rest, overrides = [], []
    args = iter(argv)
    for arg in args:
        if arg.startswith("--config."):
            key, eq, value = arg[len("--config."):].partition("=")
            overrides.append(f"{key}={value if eq else next(args, '')}")
        else:
            rest.append(arg)
    return rest, overrides


def run_cli(main: Callable, config_help: str, extra_flags: Callable | None = None, workdir: bool = True,
            setup: bool = True) -> None:
    """Define --config (plus --workdir and `extra_flags()`), load the config with its overrides, then run
    `main(config, workdir)` (`main(config)` without a workdir). `setup`: first `tune_process()` (a
    restart with malloc tunables, before jax is imported), else only JAX on the CPU where there is
    no accelerator.

    Errors a user can fix (a bad config value or override, a missing file) print one line and exit 2;
    an exception raised in a config file's or a reward function's own code keeps its traceback.
    """
    from rlhf_jax.run import runtime
    if setup:
        runtime.tune_process()
    else:
        runtime.cpu_only_without_accelerators()

    from absl import app, flags

    from rlhf_jax.config import ConfigError, load_config

    flags.DEFINE_string("config", None, config_help)
    if workdir:
        flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and outputs go.")
    if extra_flags is not None:
        extra_flags()
    flags.mark_flags_as_required(["config", "workdir"] if workdir else ["config"])
    argv, overrides = split_config_args(sys.argv)

    def _main(argv):
        del argv
        from absl import logging as absl_logging
        # Orbax narrates every save at INFO through absl: keep warnings, and our own INFO lines.
        absl_logging.set_verbosity(absl_logging.WARNING)
        logging.getLogger("rlhf_jax").setLevel(logging.INFO)
        with user_errors():
            args = (load_config(flags.FLAGS.config, overrides),)
            if workdir:
                try:
                    os.makedirs(flags.FLAGS.workdir, exist_ok=True)
                except OSError as e:
                    raise ConfigError(f"--workdir={flags.FLAGS.workdir}: cannot create it ({e.strerror})") from None
                args += (flags.FLAGS.workdir,)
            main(*args)

    app.run(_main, argv=argv)
