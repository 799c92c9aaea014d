"""Parallelism: device meshes, partition rules for parameters and activations, fused attention."""
