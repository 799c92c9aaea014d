#!/usr/bin/env bash
# Builds the virtual environments of the peer trainers that our benchmark runs side by side with ours.
# Usage: bash setup_peers.sh            (venvs go to $BENCH_VENVS, default ~/.cache/rlhf-bench)
set -euo pipefail
V=${BENCH_VENVS:-$HOME/.cache/rlhf-bench}
mkdir -p "$V"
if [ ! -x "$V/trl/bin/python" ]; then
  python3 -m venv "$V/trl"
  # torch 2.13.0 is the CPU wheel this machine keeps on disk; any other version downloads a CUDA build.
  "$V/trl/bin/pip" install -q torch==2.13.0
  # trl 1.12.0 is the last release with a PPO trainer (trl.experimental.ppo); 1.13+ removed it.
  # requests: trl.trainer.grpo_trainer imports it, and nothing else in the list brings it.
  "$V/trl/bin/pip" install -q trl==1.12.0 transformers datasets accelerate requests
fi
if [ ! -x "$V/tunix/bin/python" ]; then
  python3 -m venv "$V/tunix"
  "$V/tunix/bin/pip" install -q google-tunix==0.1.7 "jax[cpu]"
fi
echo "peer venvs ready in $V"
