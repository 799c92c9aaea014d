#!/usr/bin/env bash
# Runs both peers at one size; prints each one's JSON line (last line of its output), TRL's first.
# Usage: bash run_peers.sh small|large [ppo|grpo]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
V=${BENCH_VENVS:-$HOME/.cache/rlhf-bench}
for peer in trl tunix; do
  if [ ! -x "$V/$peer/bin/python" ]; then
    echo "no $peer venv in $V: run 'bash $HERE/setup_peers.sh' first" >&2; exit 2
  fi
done
case "${1:-small}" in
  small) L=4; D=256; H=4 ;;
  large) L=6; D=512; H=8 ;;
  *) echo "usage: run_peers.sh small|large [ppo|grpo]" >&2; exit 2 ;;
esac
case "${2:-ppo}" in
  ppo)
    "$V/trl/bin/python" "$HERE/trl_ppo_baseline.py" --n-layer $L --n-embd $D --n-head $H --vocab 1024 \
        --batch-size 32 --prompt-len 16 --response-length 32 --num-ppo-epochs 1 --num-mini-batches 1 2>/dev/null | tail -n 1
    "$V/tunix/bin/python" "$HERE/tunix_ppo_baseline.py" --quiet --layers $L --width $D --heads $H --kv-heads $H \
        --mlp $((4*D)) --vocab 1024 --batch 32 --prompt-len 16 --response-len 32 --ppo-epochs 1 2>/dev/null | tail -n 1
    ;;
  grpo)
    # 8 prompts x 4 generations, the same sizes; k3 KL (beta 0.04) against a reference in each.
    "$V/trl/bin/python" "$HERE/trl_grpo_baseline.py" --layers $L --width $D --heads $H --vocab 1024 \
        --prompts 8 --generations 4 --prompt-len 16 --response-len 32 2>/dev/null | tail -n 1
    "$V/tunix/bin/python" "$HERE/tunix_grpo_baseline.py" --quiet --layers $L --width $D --heads $H --kv-heads $H \
        --mlp $((4*D)) --vocab 1024 --prompts 8 --generations 4 --prompt-len 16 --response-len 32 2>/dev/null | tail -n 1
    ;;
  *) echo "usage: run_peers.sh small|large [ppo|grpo]" >&2; exit 2 ;;
esac
