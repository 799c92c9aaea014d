"""The shared command-line plumbing of the trainers: absl flags with an ml_collections config."""

from __future__ import annotations

import logging
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
    def _main(argv):
        del argv
        from absl import logging as absl_logging
        # Orbax narrates every save at INFO through absl: keep warnings, and our own INFO lines.
        absl_logging.set_verbosity(absl_logging.WARNING)
        logging.getLogger("rlhf_jax").setLevel(logging.INFO)
        try:
            main(flags.FLAGS.config, flags.FLAGS.workdir)
        except (ConfigError, FileNotFoundError, KeyError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    try:
        app.run(_main)
    except (AttributeError, KeyError) as e:
        # ml_collections raises these, with a traceback, for an override of a key that does not exist.
        print(f"error: bad config override: {e}", file=sys.stderr)
        sys.exit(2)
