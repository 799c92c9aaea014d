#!/usr/bin/env bash
# Runs both peers at one size; prints each one's JSON line (last line of its output), TRL's first.
# Usage: bash run_peers.sh small|large|smollm2 [ppo|grpo]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
V=${BENCH_VENVS:-$HOME/.cache/rlhf-bench}
for peer in trl tunix; do
  if [ ! -x "$V/$peer/bin/python" ]; then
    echo "no $peer venv in $V: run 'bash $HERE/setup_peers.sh' first" >&2; exit 2
  fi
done
# Each preset: TRL's GPT-2 and Tunix's Qwen3 at the same layers, width, heads and vocabulary. smollm2 is
# SmolLM2-135M's shape: Tunix's Qwen3 gets its 3 KV heads and 1,536-wide MLP (Tunix 0.1.7's Llama3 fails
# in its PPO critic: `Llama3.__call__` is passed segment_ids), and each harness runs fewer iterations
# (each takes tens of seconds there).
VOCAB=1024; TRL_ITERS=(); TUNIX_ITERS=()
case "${1:-small}" in
  small) L=4; D=256; H=4; KV=$H; MLP=$((4*D)) ;;
  large) L=6; D=512; H=8; KV=$H; MLP=$((4*D)) ;;
  smollm2) L=30; D=576; H=9; KV=3; MLP=1536; VOCAB=49152; TRL_ITERS=(--iters 4); TUNIX_ITERS=(--iters 3 --warmup 1) ;;
  *) echo "usage: run_peers.sh small|large|smollm2 [ppo|grpo]" >&2; exit 2 ;;
esac
case "${2:-ppo}" in
  ppo)
    "$V/trl/bin/python" "$HERE/trl_ppo_baseline.py" --n-layer $L --n-embd $D --n-head $H --vocab 1024 \
        --model-vocab $VOCAB --batch-size 32 --prompt-len 16 --response-length 32 --num-ppo-epochs 1 \
        --num-mini-batches 1 "${TRL_ITERS[@]}" 2>/dev/null | tail -n 1
    "$V/tunix/bin/python" "$HERE/tunix_ppo_baseline.py" --quiet --layers $L --width $D --heads $H \
        --kv-heads $KV --mlp $MLP --vocab $VOCAB --batch 32 --prompt-len 16 --response-len 32 --ppo-epochs 1 \
        "${TUNIX_ITERS[@]}" 2>/dev/null | tail -n 1
    ;;
  grpo)
    # 8 prompts x 4 generations, the same sizes; k3 KL (beta 0.04) against a reference in each.
    "$V/trl/bin/python" "$HERE/trl_grpo_baseline.py" --layers $L --width $D --heads $H --vocab $VOCAB \
        --prompts 8 --generations 4 --prompt-len 16 --response-len 32 "${TRL_ITERS[@]}" 2>/dev/null | tail -n 1
    "$V/tunix/bin/python" "$HERE/tunix_grpo_baseline.py" --quiet --layers $L --width $D \
        --heads $H --kv-heads $KV --mlp $MLP --vocab $VOCAB --prompts 8 --generations 4 --prompt-len 16 \
        --response-len 32 "${TUNIX_ITERS[@]}" 2>/dev/null | tail -n 1
    ;;
  *) echo "usage: run_peers.sh small|large|smollm2 [ppo|grpo]" >&2; exit 2 ;;
esac
