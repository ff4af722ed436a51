#!/usr/bin/env bash
# The GPU checks of the open issues in one command, sized for one device call (10 minutes, 15 of device time per
# session): the CUDA/Triton tests, then the benchmarks of #11 (loss engine vs Liger-Kernel), #6 (GRPO step vs TRL)
# and #4 (teacher-logits store vs a bare forward).  Each step has its own time limit and writes its output (stdout
# and stderr in one file, so at most 8 files come back from the device) under $OUT (default bench-out/), so a step
# that runs long costs only itself.  STEPS=loss,train (any of tests, sweep, loss, loss_chunks, loss_topk, train, mask,
# backend, topk, kernels, launches, epilogue, baseline, teacher, teacher_profile) runs only those; #11 alone:
# STEPS=tests,loss (about 3 minutes on an H200: tests 70 s, loss 115 s on 2026-11-27).  tests, sweep, loss, train and teacher took
# 51 + 11 + 87 + 64 + 69 s on an H200 (the device's start-up apart, ~30 s); on an H100 (2026-11-27), tests 52 s,
# train 82 + 59 s (its two runs), mask 31 s, topk 17 s, teacher 69 + 34 s (its three k in bf16 with a profile, then mixed lengths
# twice); on an H200 the same day, backend 25 + 22 s, teacher 56 + 26 s, tests 39 s; on an H200 (2026-11-27),
# tests 40 s, loss 87 s, topk 12 s, kernels 6 s, baseline 7 + 6 s, teacher 41 + 28 s (bf16 and fp32 at three k,
# then mixed lengths twice), train 77 + 53 s; teacher with TEACHER_REPEATS=3 92 + 36 s; on two H100s (later that day)
# tests 39 / 66 s, loss 105 / 113 s, loss_chunks 25 s, loss_topk 14 / 17 s, launches 18 s, kernels 10 s.
# A fresh machine's start costs about a minute of device time per call: few, full calls.
#
# On the device machine (no network; torch, triton, transformers there already), from the repository root, with the
# pure-Python wheels carried in .whl/ (liger-kernel, trl and its datasets, dill, multiprocess):
#
#     device run  carry=[".whl"]  timeout_s=590  command="bash bench/gpu_session.sh"
#
# fdivctl itself is used from the working tree (PYTHONPATH), not installed.
set -uo pipefail
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step() {  # step NAME SECONDS COMMAND…: run COMMAND with a time limit, its stdout and stderr appended to $OUT/NAME
    local name=$1 seconds=$2
    shift 2
    local start=$SECONDS
    timeout "$seconds" "$@" >>"$OUT/$name" 2>&1
    echo "$name: exit $? after $((SECONDS - start)) s"
}

if ! nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"; then
    echo "no NVIDIA GPU here: these checks are for the device machine" >&2
    exit 1
fi
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
# the carried wheels into /tmp/site (the device's own pip may serve another Python than `python`)
python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | grep -v "Running pip as the 'root' user"
export PYTHONPATH="$PYTHONPATH:/tmp/site"
python -c "import liger_kernel, trl; print('liger-kernel and trl importable')" | tee -a "$OUT/gpu.txt"
STEPS=${STEPS:-tests,sweep,loss,loss_topk,train,mask,backend,topk,kernels,teacher}  # which steps run (comma-separated), e.g. STEPS=loss,train
want() { [[ ",$STEPS," == *",$1,"* ]]; }
want tests && step gpu_tests.txt 200 python -m pytest -q -p no:cacheprovider tests/test_engine_cuda.py tests/test_engine_triton.py \
    tests/test_distill_cuda.py tests/test_teacher_logits_cuda.py tests/test_train_cuda.py \
    "tests/test_distributed.py::test_an_nccl_group_also_reduces_the_loops_cpu_figures"
# the head chunk and the weight-gradient GEMM's rows side by side (1: one GEMM per chunk, as before; 0: the default),
# in the loss step's file (the lines with variants triton only): at most 8 files come back
want sweep && step loss_engine_cuda.jsonl 40 python bench/loss_engine.py --device cuda --repeats 3 --divergences jsd \
    --variants triton --shapes 8192,4096,151936 8192,2048,151936 --chunk-size 256,512,1024 --weight-grad-rows 1,0,8192
want loss && step loss_engine_cuda.jsonl 220 python bench/loss_engine.py --device cuda --repeats 3 --divergences jsd,fkl
# #11's throughput at the two largest shapes with head chunks above the default (384 rows at V = 151936), beside the
# GEMMs alone in each chunking: whether bigger GEMMs reach 60 % of the bf16 peak
want loss_chunks && step loss_engine_cuda.jsonl 80 python bench/loss_engine.py --device cuda --repeats 3 \
    --divergences fkl,jsd --variants triton,gemm_floor --shapes 32768,4096,151936 32768,2048,151936 \
    --chunk-size 384,512,768
# a logit store's top 64 as the target (offline distillation): the PyTorch chunk path vs the Triton top-k path and
# the GEMMs alone, in the same file (the lines with "target": "topk")
want loss_topk && step loss_engine_cuda.jsonl 90 python bench/loss_engine.py --device cuda --repeats 3 --target topk \
    --divergences jsd,fkl --variants engine,triton,gemm_floor --shapes 8192,2048,151936 32768,4096,151936
# TRL's column: GRPOTrainer 1.16's fused head (trl_path); fdivctl_k3 beside the full estimator
want train && step train_step_cuda.jsonl 130 python bench/train_step.py --device cuda --dtype bf16 --repeats 3 \
    --chunk-sizes 1024,2048,4096 --profile "$OUT/train_step_profile.txt"
# the same with the policy's layers recomputed in backward, GRPOConfig's default (grad_checkpointing: true)
want train && step train_step_cuda.jsonl 80 python bench/train_step.py --device cuda --dtype bf16 --repeats 3 \
    --grad-checkpointing
# the decoder on a right-padded batch of mixed lengths with its padding mask vs without (LMHead.hidden), score and train
want mask && step attention_cuda.jsonl 60 python bench/attention_mask.py --device cuda
# SDPA's cuDNN backend vs FlashAttention on batches of new and of seen shapes (load_causal_lm leaves cuDNN out), at
# teacher-logits' batch and at two rows of 8192 tokens (one file with the mask step's: at most 8 files come back)
want backend && step attention_cuda.jsonl 90 python bench/attention_backend.py --device cuda
want backend && step attention_cuda.jsonl 60 python bench/attention_backend.py --device cuda --rows 2 --length 8192
# #4's summary alone (head_topk: Triton vs PyTorch vs the head matmul), with its kernel profile; the engine's two
# row kernels alone on one 384-row chunk at V = 151936, against the bytes they move (#6, #11), in the same file
want topk && step row_kernels_cuda.txt 30 python bench/topk_summary.py --device cuda \
    --profile "$OUT/topk_summary_profile.txt"
want kernels && step row_kernels_cuda.txt 30 python bench/chunk_kernels.py --device cuda
# a Triton logits GEMM with the row statistics in its epilogue against cuBLAS's logits GEMM and the statistics
# pass it would replace, at the chunk shapes (#11; on an H200 it ran at 0.70–0.75 of cuBLAS: not in the engine)
want epilogue && step row_kernels_cuda.txt 150 python bench/logits_epilogue.py --device cuda
# the two row kernels at other launches (block × warps × software-pipelining stages, statistics/gradient), the
# engine's own first: whether more loads in flight bring the statistics kernel nearer HBM's bandwidth (#11)
want launches && step row_kernels_cuda.txt 120 python bench/chunk_kernels.py --device cuda \
    --divergences fkl,jsd,rkl,none --launches 2048x16x1/4096x16x1 2048x16x2/4096x16x2 2048x16x3/4096x16x3 \
    1024x8x3/2048x8x3 4096x32x2/8192x32x2 2048x8x2/4096x8x2 1024x4x4/2048x4x4
# both row-kernel benches again against an older fdivctl package in .baseline/ (carried; made with
# `mkdir .baseline && git archive REV fdivctl | tar -x -C .baseline`), so a kernel rewrite is timed beside the code it
# replaces on the same chip: the lines after "#### baseline" in the same file
if want baseline && [ -d .baseline/fdivctl ]; then
    echo "#### baseline: .baseline/fdivctl" >>"$OUT/row_kernels_cuda.txt"
    PYTHONPATH="$PWD/.baseline:$PYTHONPATH" step row_kernels_cuda.txt 30 python bench/topk_summary.py --device cuda
    PYTHONPATH="$PWD/.baseline:$PYTHONPATH" step row_kernels_cuda.txt 30 python bench/chunk_kernels.py --device cuda
fi
# #4's target at every k and both store dtypes (bf16 and fp32 log-probs), without a profile (STEPS=teacher_profile
# adds one more bf16 run with it)
# (TEACHER_REPEATS=3: each store and bare forward three times, as the bare forward alone varied 62–66 ms a batch
# between runs on an H200)
TEACHER_REPEATS=${TEACHER_REPEATS:-1}
want teacher && step teacher_logits_cuda.jsonl $((30 + 50 * TEACHER_REPEATS)) python bench/teacher_logits.py --device cuda \
    --hidden 896 --layers 24 --vocab 151936 --sequences 256 --prompt-len 128 --completion-len 896 --batch-size 16 \
    --model-dtype bf16 --dtypes bf16,fp32 --repeats "$TEACHER_REPEATS"
want teacher_profile && step teacher_logits_cuda.jsonl 100 python bench/teacher_logits.py --device cuda --hidden 896 \
    --layers 24 --vocab 151936 --sequences 256 --prompt-len 128 --completion-len 896 --batch-size 16 --model-dtype bf16 \
    --dtypes bf16 --profile "$OUT/teacher_logits_profile.txt"
# mixed lengths twice in one process: store_batch_ms / bare_batch_ms show whether first-seen shapes are the cost
want teacher && step teacher_logits_cuda.jsonl 60 python bench/teacher_logits.py --device cuda --hidden 896 --layers 24 \
    --vocab 151936 --sequences 256 --prompt-len 128 --completion-len 896 --batch-size 16 --model-dtype bf16 \
    --dtypes bf16 --ks 64 --length-spread 0.9 --repeats 2
# the profiles in one file: at most 8 files come back from the device
for profile in "$OUT"/*_profile.txt; do
    [ -e "$profile" ] && { echo "#### $(basename "$profile")"; cat "$profile"; rm "$profile"; }
done >"$OUT/profiles.txt"
if want tests; then tail -n 3 "$OUT"/gpu_tests.txt; fi
