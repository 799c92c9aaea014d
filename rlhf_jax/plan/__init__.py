"""Planning a run: its programs compiled from shapes (for a TPU slice's compile-only devices or the
local ones), read for FLOPs, bytes and collectives, and put on a roofline. `python -m rlhf_jax.plan`."""
