"""Attention backends on batches whose shapes change: what a first-seen shape costs under each, side by side.

torch 2.11 runs cuDNN attention first on an H100 or H200, and cuDNN builds an execution plan for each
(batch, length) it has not met.  fdivctl's batches are right-padded to their longest row, so in teacher-logits,
distill and train nearly every batch has a length of its own; :func:`fdivctl.io.checkpoints.load_causal_lm`
therefore takes cuDNN out of SDPA's backends on CUDA.  This measures that choice on the path every stage runs,
``LMHead.hidden``: for each backend (forced with ``torch.nn.attention.sdpa_kernel``) the decoder goes over
``--batches`` batches of distinct lengths, each met for the first time, then over the same batches again.  Each
backend and mode gets lengths of its own, so neither warms the other's GEMM heuristics.  Two modes: ``score``
(no gradients: teacher-logits, reference log-probs) and ``train`` (forward and backward of a loss on the hidden
states: distill, train).

Prints one JSON object per mode with, per backend ``b``, ``b_first_ms`` and ``b_seen_ms`` (medians over the
batches) and ``b_new_shape_ms`` (their difference: what meeting a shape costs), and for the first two backends
``first_seen_ratio`` and ``seen_ratio`` (first ÷ second: above 1, the first backend is slower).  The CPU has no
cuDNN: there the backends default to flash and math, which checks the harness, not the claim.

    python bench/attention_backend.py --quick                 # CPU, a small model: seconds
    python bench/attention_backend.py --device cuda           # cudnn vs flash: hidden 896, 24 layers, 16 × 1024
    python bench/attention_backend.py --device cuda --rows 2 --length 8192
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from fdivctl import tiny
from fdivctl.io.lm_head import LMHead
from attention_mask import random_sequences  # bench/attention_mask.py, profiling.py: beside this script
from profiling import median_ms

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
SHAPES = {
    "quick": dict(hidden=256, layers=2, rows=2, length=256, dtype="fp32"),
    "cpu": dict(hidden=512, layers=4, rows=4, length=512, dtype="fp32"),
    "cuda": dict(hidden=896, layers=24, rows=16, length=1024, dtype="bf16"),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VOCAB = 32768  # the decoder alone runs: the vocabulary only sizes the embedding
STEP = 8  # tokens between two batches' lengths


def _batch(rows: int, length: int, device: torch.device) -> dict:
    """``rows`` random sequences of ``length`` tokens (a quarter prompt), as ``Sequences.batch`` gives them."""
    shape = dict(rows=rows, prompt=max(1, length // 4), longest=length, vocab=VOCAB)
    return random_sequences(shape, spread=0.0).batch(list(range(rows)), pad_id=0, device=device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backends", default=None,
                        help=f"comma-separated, of {', '.join(BACKENDS)} (default: cudnn,flash on CUDA, flash,math "
                        "on the CPU)")
    parser.add_argument("--batches", type=int, default=6, help="batches of distinct lengths per backend and mode")
    parser.add_argument("--rows", type=int, default=None, help="sequences per batch (default: the device's shape)")
    parser.add_argument("--length", type=int, default=None,
                        help="the longest batch's tokens per row; the others are 8, 16, … shorter")
    parser.add_argument("--quick", action="store_true", help="a small CPU model and batch (seconds)")
    args = parser.parse_args()
    device = torch.device(args.device)
    shape = dict(SHAPES["quick" if args.quick else device.type])
    shape.update({k: v for k, v in (("rows", args.rows), ("length", args.length)) if v is not None})
    backends = (args.backends or ("cudnn,flash" if device.type == "cuda" else "flash,math")).split(",")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or len(backends) < 2:
        parser.error(f"--backends: two or more of {', '.join(BACKENDS)} (got {args.backends!r})")
    lowest = shape["length"] - STEP * (2 * len(backends) * args.batches - 1)
    if lowest < 8:
        parser.error(f"--length {shape['length']} leaves no room for {args.batches} lengths per backend and mode")
    model = tiny.random_lm(shape["hidden"], shape["layers"], VOCAB, 0, max_positions=shape["length"])
    lm = LMHead.of(model.to(device=device, dtype=DTYPES[shape["dtype"]]), "model")

    def score(batch):
        with torch.no_grad():
            lm.hidden(batch)

    def train(batch):
        model.zero_grad(set_to_none=True)
        lm.hidden(batch).float().pow(2).mean().backward()

    for name in backends:  # each backend's kernels loaded once, on a shape the run does not time
        with sdpa_kernel([BACKENDS[name]]):
            score(_batch(1, 16, device))
            train(_batch(1, 16, device))
    lengths = iter(range(shape["length"], lowest - 1, -STEP))  # every batch of the run a length of its own
    for mode, run in (("score", score), ("train", train)):
        record = {"device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(), "mode": mode,
                  "shape": shape, "batches": args.batches}
        for name in backends:
            batches = [_batch(shape["rows"], next(lengths), device) for _ in range(args.batches)]
            with sdpa_kernel([BACKENDS[name]]):
                first = [median_ms(lambda b=b, r=run: r(b), device, 1, warm_up=False) for b in batches]
                seen = [median_ms(lambda b=b, r=run: r(b), device, 1, warm_up=False) for b in batches]
            record[f"{name}_first_ms"] = statistics.median(first)
            record[f"{name}_seen_ms"] = statistics.median(seen)
            record[f"{name}_new_shape_ms"] = record[f"{name}_first_ms"] - record[f"{name}_seen_ms"]
        a, b = backends[:2]
        record["first_seen_ratio"] = record[f"{a}_first_ms"] / record[f"{b}_first_ms"]
        record["seen_ratio"] = record[f"{a}_seen_ms"] / record[f"{b}_seen_ms"]
        model.zero_grad(set_to_none=True)
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
