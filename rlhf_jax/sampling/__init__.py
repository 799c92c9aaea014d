"""Sampling: the decode loop (`generate`) and the rollout of a run (`make_rollout`)."""
