#!/usr/bin/env bash
# On-policy distillation on the built-in demo task, on a CPU in a few minutes.
# The student samples its own completions and the teacher scores them, so it learns where it actually goes
# (no exposure bias) — but a sampled-token reward log p − log q is noisy. From one SFT-warmed student and one
# teacher, four students trained on the same prompts for the same steps:
#   opd   the sampled token's reward as a policy gradient (REINFORCE)
#   vopd  the same with vOPD's detached baseline −KL(q‖p) per position: same expected gradient, less noise
#   rkl   the reverse KL over the whole vocabulary at each sampled position (GKD-style, no sampling noise)
#   jsd   Jensen–Shannon (β = 0.5) over the whole vocabulary at each sampled position
# then the noise each run's gradient carried (advantage_rms, logged per step) and pass@k of every model.
# Usage: examples/on_policy_distill.sh [OUT] ; SCALE=quick keeps every stage tiny (the test suite runs that).
set -euo pipefail
OUT="${1:-opd-out}"
VERIFY="python:fdivctl.demo.task:verify"
if [[ "${SCALE:-full}" == quick ]]; then
  TEACHER_HIDDEN=64; TEACHER_EPOCHS=2; STUDENT_EPOCHS=1; STEPS=4; SAMPLES=4
else
  TEACHER_HIDDEN=256; TEACHER_EPOCHS=10; STUDENT_EPOCHS=2; STEPS=40; SAMPLES=16
fi

# the task, the teacher (a random-init Qwen2 fine-tuned on the demonstrations) and a smaller student, warmed up
# by a little SFT on the same demonstrations (on-policy distillation starts from a student that can sample)
fdivctl demo data "$OUT"/data --sft-per-prompt 32
fdivctl demo init "$OUT"/data/tokenizer "$OUT"/random --hidden "$TEACHER_HIDDEN" --layers 4
fdivctl train "$OUT"/random "$OUT"/teacher --algo sft --data "$OUT"/data/sft.parquet --lr 1e-3 --batch-size 32 \
  --epochs "$TEACHER_EPOCHS"
fdivctl demo init "$OUT"/data/tokenizer "$OUT"/student-init --hidden 64 --layers 2 --seed 1
fdivctl train "$OUT"/student-init "$OUT"/student --algo sft --data "$OUT"/data/sft.parquet --lr 1e-3 \
  --batch-size 32 --epochs "$STUDENT_EPOCHS"

# four on-policy students: each micro-batch, 8 prompts × 4 samples from the student's current weights
for run in "opd --loss opd" "vopd --loss opd --baseline vopd" "rkl --loss rkl" "jsd --loss jsd"; do
  read -r name loss <<<"$run"
  # shellcheck disable=SC2086  # $loss holds several options
  fdivctl distill "$OUT"/student "$OUT"/$name --on-policy --prompts "$OUT"/data/prompts.parquet \
    --teacher "$OUT"/teacher $loss --samples-per-prompt 4 --max-new-tokens 12 --batch-size 8 --lr 1e-3 \
    --lr-schedule constant --max-steps "$STEPS" --log-jsonl "$OUT"/$name.jsonl
done

# the policy-gradient noise of the two sampled-token runs: mean advantage_rms over their steps
python - "$OUT" <<'PY'
import json, sys
for name in ("opd", "vopd"):
    steps = [json.loads(line) for line in open(f"{sys.argv[1]}/{name}.jsonl")]
    rms = [s["advantage_rms"] for s in steps if "advantage_rms" in s]
    print(f"{name}: mean advantage_rms {sum(rms) / len(rms):.3f} over {len(rms)} steps")
PY

# every model sampled on the held-out and training targets (same seed), scored and evaluated together: pass@k, and
# KL to the teacher from each model's samples
models=()
for model in teacher student opd vopd rkl jsd; do models+=(--model "$OUT"/$model); done
fdivctl eval "$OUT"/report "${models[@]}" --prompts "$OUT"/data/eval_prompts.parquet --verifier "$VERIFY" \
  --n "$SAMPLES" --sampling-seed 1234 --max-new-tokens 12 --base student --kl-model "$OUT"/teacher \
  --domain-column domain
