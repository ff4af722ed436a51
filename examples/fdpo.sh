#!/usr/bin/env bash
# On-policy preference optimization with a verifier, one divergence per run, on the built-in demo task, on a CPU in
# a few minutes. The policy samples each training prompt, the verifier scores the samples, and `fdivctl pairs`
# pairs a correct sample (chosen) with an incorrect one (rejected) of the same prompt, keeping the sampled token
# ids. Then f-DPO on the same pairs, same steps, with reverse KL (standard DPO), forward KL and Jensen–Shannon
# (Wang et al., "Beyond Reverse KL", 2023: the divergence sets the trade-off between alignment and the diversity
# of what the policy generates), each alone and with Iterative RPO's NLL term on the chosen samples (Pang et al.
# 2024, --nll-coef 1), and pass@k and distinct correct answers of each.
# Usage: examples/fdpo.sh [OUT] ; SCALE=quick keeps every stage tiny (the test suite runs that).
set -euo pipefail
OUT="${1:-fdpo-out}"
VERIFY="python:fdivctl.demo.task:verify"
if [[ "${SCALE:-full}" == quick ]]; then
  HIDDEN=64; SFT_EPOCHS=4; STEPS=4; SAMPLES=4
else
  HIDDEN=256; SFT_EPOCHS=12; STEPS=60; SAMPLES=16
fi

# the task and the policy: a random-init Qwen2 fine-tuned on the demonstrations
fdivctl demo data "$OUT"/data --sft-per-prompt 32
fdivctl demo init "$OUT"/data/tokenizer "$OUT"/random --hidden "$HIDDEN" --layers 4
fdivctl train "$OUT"/random "$OUT"/policy --algo sft --data "$OUT"/data/sft.parquet --lr 1e-3 --batch-size 32 \
  --epochs "$SFT_EPOCHS"

# on-policy pairs: 16 samples per training prompt, scored, up to 8 (correct, incorrect) pairs per prompt
fdivctl rollout "$OUT"/policy "$OUT"/data/prompts.parquet "$OUT"/rollouts.parquet --n 16 --seed 1 \
  --max-new-tokens 12
fdivctl score "$OUT"/rollouts.parquet "$OUT"/rollouts.scored.parquet --verifier "$VERIFY"
fdivctl pairs "$OUT"/rollouts.scored.parquet "$OUT"/pairs.parquet --per-prompt 8

# f-DPO with three divergences, each without and with the NLL term: the same pairs, β, steps and seed
models=(--model "$OUT"/policy)
for divergence in rkl fkl jsd; do
  for nll in 0 1; do
    name=fdpo-$divergence$([[ $nll == 1 ]] && echo -nll || true)
    fdivctl train "$OUT"/policy "$OUT"/$name --algo fdpo --pairs "$OUT"/pairs.parquet --divergence $divergence \
      --nll-coef $nll --beta 0.1 --lr 1e-4 --lr-schedule constant --batch-size 8 --max-steps "$STEPS" \
      --log-jsonl "$OUT"/$name.jsonl
    models+=(--model "$OUT"/$name)
  done
done

# every model sampled on the held-out and training targets (same seed), scored, and evaluated together: pass@k,
# distinct correct answers, forgetting, KL to the policy
fdivctl eval "$OUT"/report "${models[@]}" --prompts "$OUT"/data/eval_prompts.parquet --verifier "$VERIFY" \
  --n "$SAMPLES" --sampling-seed 1234 --max-new-tokens 12 --base policy --kl-model "$OUT"/policy \
  --domain-column domain
