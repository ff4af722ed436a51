#!/usr/bin/env bash
# ERPD (Extreme Region Policy Distillation) on the built-in demo task, on a CPU in a few minutes.
# Stage 1 squeezes fixed rollouts with aggressive off-policy optimization (many PPO epochs, wide clip, no KL);
# its token distributions are cached once; stage 2 distills them into the base under a trust region that
# drops the tokens where stage 1 drifted more than a factor e^ε from the base (distill --trust-region).
# Usage: examples/erpd.sh [OUT] ; SCALE=quick keeps every stage tiny (the test suite runs that).
set -euo pipefail
OUT="${1:-erpd-out}"
VERIFY="python:fdivctl.demo.task:verify"
if [[ "${SCALE:-full}" == quick ]]; then
  HIDDEN=64; LAYERS=2; SFT_EPOCHS=2; SAMPLES=4; EPOCHS=4
else
  HIDDEN=128; LAYERS=4; SFT_EPOCHS=8; SAMPLES=8; EPOCHS=8
fi

# the task and the base policy: a random-init Qwen2, fine-tuned on the demonstrations
fdivctl demo data "$OUT"/data --sft-per-prompt 16
fdivctl demo init "$OUT"/data/tokenizer "$OUT"/random --hidden "$HIDDEN" --layers "$LAYERS"
fdivctl train "$OUT"/random "$OUT"/base --algo sft --data "$OUT"/data/sft.parquet --lr 3e-3 --batch-size 32 \
  --epochs "$SFT_EPOCHS"

# the fixed data: the base's scored rollouts
fdivctl rollout "$OUT"/base "$OUT"/data/prompts.parquet "$OUT"/rollouts.parquet --n "$SAMPLES" --seed 1 \
  --max-new-tokens 12
fdivctl score "$OUT"/rollouts.parquet "$OUT"/rollouts.scored.parquet --verifier "$VERIFY"

# stage 1: weakly constrained off-policy optimization on the fixed data
fdivctl train "$OUT"/base "$OUT"/stage1 --rollouts "$OUT"/rollouts.scored.parquet --ppo-epochs "$EPOCHS" \
  --minibatch-size 16 --clip-low 0.5 --clip-high 1.0 --lr 1e-3 --log-jsonl "$OUT"/stage1.jsonl

# the stage-1 policy's token-level supervision, cached once
fdivctl teacher-logits "$OUT"/stage1 "$OUT"/rollouts.scored.parquet "$OUT"/stage1-logits --k 32

# stage 2: distill stage 1 into the base under the trust region
fdivctl distill "$OUT"/base "$OUT"/erpd --data "$OUT"/rollouts.scored.parquet --logits "$OUT"/stage1-logits \
  --loss fkl --trust-region 1.0 --lr 1e-3 --batch-size 16 --epochs "$EPOCHS" --log-jsonl "$OUT"/erpd.jsonl

# base, stage 1 and ERPD sampled on the eval prompts (same seed), scored and side by side: pass@k, with the base as
# the reference
fdivctl eval "$OUT"/report --model "$OUT"/base --model "$OUT"/stage1 --model "$OUT"/erpd \
  --prompts "$OUT"/data/eval_prompts.parquet --verifier "$VERIFY" --n 8 --sampling-seed 1234 --max-new-tokens 12 \
  --base base --k 1,2,4,8
