"""A run: the trainer and its host loop, data and loading, checkpoints, metrics, process setup and
the shared command-line plumbing."""
