"""The shared command-line plumbing of the trainers: absl flags with an ml_collections config."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable


def run_cli(main: Callable, config_help: str, extra_flags: Callable | None = None) -> None:
    """Define --config and --workdir (plus `extra_flags()`), then run `main(config, workdir)`.

    Errors a user can fix (a bad config value or override, a missing file) print one line and exit 2.
    """
    from rlhf_jax.runtime import use_huge_pages
    use_huge_pages()

    from absl import app, flags
    from ml_collections import config_flags

    from rlhf_jax.config import ConfigError

    config_flags.DEFINE_config_file("config", None, config_help, lock_config=True)
    flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and outputs go.")
    if extra_flags is not None:
        extra_flags()
    flags.mark_flags_as_required(["config", "workdir"])
    started = []

    def _main(argv):
        del argv
        config = flags.FLAGS.config
        config.keys()  # a config file that failed to load raises on first use: here, as a user's mistake
        started.append(True)
        from absl import logging as absl_logging

        from rlhf_jax.models.hf import CheckpointError
        # Orbax narrates every save at INFO through absl: keep warnings, and our own INFO lines.
        absl_logging.set_verbosity(absl_logging.WARNING)
        logging.getLogger("rlhf_jax").setLevel(logging.INFO)
        workdir = flags.FLAGS.workdir
        try:
            os.makedirs(workdir, exist_ok=True)
        except OSError as e:
            print(f"error: --workdir={workdir}: cannot create it ({e.strerror})", file=sys.stderr)
            sys.exit(2)
        try:
            main(config, workdir)
        except (ConfigError, CheckpointError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    try:
        app.run(_main)
    except (AttributeError, KeyError, OSError, SyntaxError) as e:
        if started:
            raise  # from the run itself (a user's reward function, say): its own traceback
        # ml_collections raises these, with a traceback, while it reads the config file and its overrides.
        key = str(e.args[0]).strip("\"'") if isinstance(e, (KeyError, AttributeError)) and len(e.args) == 1 else ""
        if key and " " not in key:
            message = f"no such config key {key!r}"
        else:
            message = " ".join(line.strip() for line in str(e).splitlines()[:4] if line.strip()) or type(e).__name__
        print(f"error: bad --config or override: {message}", file=sys.stderr)
        sys.exit(2)
