#!/usr/bin/env bash
# Iterative reasoning preference optimization (Pang et al. 2024) on the built-in demo task, on a CPU in a few
# minutes: each iteration t samples the current model M_t on the training prompts, scores the samples with the
# verifier, pairs a correct sample over an incorrect one per prompt, and trains M_{t+1} from M_t with f-DPO plus
# the NLL term on the chosen samples, M_t being the reference (`train` takes the initial policy as the
# reference by default). Every stage is a file-to-file command, so the loop is a shell loop. At the end every
# M_t is sampled on the held-out and training targets and evaluated together.
# Usage: examples/iterative_rpo.sh [OUT] ; DIVERGENCE=jsd (default rkl, the paper's DPO) picks f-DPO's
# divergence; SCALE=quick keeps every stage tiny (the test suite runs that).
set -euo pipefail
OUT="${1:-rpo-out}"
DIVERGENCE="${DIVERGENCE:-rkl}"
VERIFY="python:fdivctl.demo.task:verify"
if [[ "${SCALE:-full}" == quick ]]; then
  HIDDEN=64; SFT_EPOCHS=4; ITERATIONS=2; SAMPLES_PER_PROMPT=16; STEPS=4; EVAL_SAMPLES=4
else
  HIDDEN=256; SFT_EPOCHS=12; ITERATIONS=3; SAMPLES_PER_PROMPT=16; STEPS=40; EVAL_SAMPLES=16
fi

# the task and M_0: a random-init Qwen2 fine-tuned on the demonstrations
fdivctl demo data "$OUT"/data --sft-per-prompt 32
fdivctl demo init "$OUT"/data/tokenizer "$OUT"/random --hidden "$HIDDEN" --layers 4
fdivctl train "$OUT"/random "$OUT"/m0 --algo sft --data "$OUT"/data/sft.parquet --lr 1e-3 --batch-size 32 \
  --epochs "$SFT_EPOCHS"

models=(--model "$OUT"/m0)
for ((t = 0; t < ITERATIONS; t++)); do
  it="$OUT"/iter$t
  fdivctl rollout "$OUT"/m$t "$OUT"/data/prompts.parquet "$it".rollouts.parquet --n "$SAMPLES_PER_PROMPT" \
    --seed $((t + 1)) --max-new-tokens 12
  fdivctl score "$it".rollouts.parquet "$it".scored.parquet --verifier "$VERIFY"
  fdivctl pairs "$it".scored.parquet "$it".pairs.parquet --per-prompt 8 --seed "$t"
  fdivctl train "$OUT"/m$t "$OUT"/m$((t + 1)) --algo fdpo --pairs "$it".pairs.parquet --divergence "$DIVERGENCE" \
    --nll-coef 1 --beta 0.1 --lr 1e-4 --lr-schedule constant --batch-size 8 --max-steps "$STEPS" \
    --log-jsonl "$it".fdpo.jsonl
  models+=(--model "$OUT"/m$((t + 1)))
done

fdivctl eval "$OUT"/report "${models[@]}" --prompts "$OUT"/data/eval_prompts.parquet --verifier "$VERIFY" \
  --n "$EVAL_SAMPLES" --sampling-seed 1234 --max-new-tokens 12 --base m0 --kl-model "$OUT"/m0 \
  --domain-column domain
