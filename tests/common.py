"""What many tests share: the repository's root and its configs, loaded as the command line loads them."""

import os

from rlhf_jax.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(name: str = "tiny", **overrides):
    """configs/<name>.py with dotted overrides given as keyword arguments, "__" for the dots
    (`config(train__num_iterations=2)`)."""
    return load_config(os.path.join(ROOT, "configs", f"{name}.py"),
                       {key.replace("__", "."): value for key, value in overrides.items()})
