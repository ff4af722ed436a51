"""A right-padded batch through the decoder with and without its padding mask, side by side in one run.

Every stage reads a model's hidden states through :meth:`fdivctl.io.lm_head.LMHead.hidden`, which runs the
decoder on the right-padded batch without an attention mask: in a causal decoder a real position attends only
to real positions before it, so the mask changes nothing that is read (the check below measures it).  The
usual recipe passes the padding mask, ``decoder(input_ids, attention_mask=mask)``; transformers then builds a
``[B, 1, L, L]`` mask and SDPA runs its masked kernel instead of the fused causal one.  On the same model and
batch of mixed lengths this times:

* ``masked`` — the decoder with the padding mask (and no key/value cache, as ``LMHead.hidden``), then the
  scored positions' hidden states;
* ``fdivctl`` — ``LMHead.hidden``;

in two modes: ``score`` (no gradients: teacher-logits, reference log-probs) and ``train`` (forward and
backward of a loss on the scored hidden states: distill, train).  Prints one JSON object per mode with each
variant's median ms (``*_ms``), ``speedup`` (masked ÷ fdivctl), on CUDA each variant's peak memory above the
model and batch (``*_peak_bytes``), ``padding_ratio`` (positions in the batch ÷ real tokens) and
``max_abs_diff`` (the two variants' scored hidden states, score mode).

    python bench/attention_mask.py --quick            # CPU, a small model: seconds
    python bench/attention_mask.py                    # CPU: hidden 512, 4 layers, 8 rows of 64 + ≤ 960 tokens
    python bench/attention_mask.py --device cuda      # hidden 896, 24 layers, 16 rows of 128 + ≤ 1920 tokens, bf16
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np
import torch

from fdivctl import tiny
from fdivctl.io.lm_head import LMHead
from fdivctl.io.sequences import Sequences
from profiling import median_ms  # bench/profiling.py, beside this script

SHAPES = {
    "quick": dict(hidden=128, layers=2, vocab=1024, rows=4, prompt=16, longest=256, dtype="fp32"),
    "cpu": dict(hidden=512, layers=4, vocab=8192, rows=8, prompt=64, longest=1024, dtype="fp32"),
    "cuda": dict(hidden=896, layers=24, vocab=151936, rows=16, prompt=128, longest=2048, dtype="bf16"),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def random_sequences(shape: dict, spread: float) -> Sequences:
    """``rows`` random sequences: a ``prompt``-token prompt, a completion of uniform length in
    ((1 − spread)·(longest − prompt), longest − prompt]."""
    g = np.random.default_rng(0)
    most = shape["longest"] - shape["prompt"]
    lengths = g.integers(max(1, round(most * (1 - spread))), most + 1, shape["rows"])
    return Sequences([f"p{i}" for i in range(shape["rows"])], [0] * shape["rows"],
                     [g.integers(3, shape["vocab"], shape["prompt"]) for _ in lengths],
                     [g.integers(3, shape["vocab"], n) for n in lengths], None)


def _masked_hidden(lm: LMHead, batch: dict, mask: torch.Tensor) -> torch.Tensor:
    """The usual recipe: the decoder with the padding mask, then the scored positions."""
    out = lm.decoder(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False)  # no cache, as LMHead's
    return out.last_hidden_state[batch["batch_index"], batch["position"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--spread", type=float, default=0.9, help="completion lengths' spread (0: all the longest)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="a small CPU model and batch (seconds)")
    args = parser.parse_args()
    device = torch.device(args.device)
    shape = SHAPES["quick" if args.quick else device.type]
    dtype = DTYPES[shape["dtype"]]
    model = tiny.random_lm(shape["hidden"], shape["layers"], shape["vocab"], 0,
                           max_positions=shape["longest"]).to(device=device, dtype=dtype)
    lm = LMHead.of(model, "model")
    seqs = random_sequences(shape, args.spread)
    rows = list(range(len(seqs)))
    batch = seqs.batch(rows, pad_id=0, device=device)
    lengths = torch.tensor(seqs.lengths(), device=device)
    mask = (torch.arange(batch["input_ids"].shape[1], device=device) < lengths[:, None]).long()
    weights = torch.rand(batch["token"].shape[0], device=device)
    variants = {"masked": lambda: _masked_hidden(lm, batch, mask), "fdivctl": lambda: lm.hidden(batch)}

    def train(hidden_of):
        model.zero_grad(set_to_none=True)
        (hidden_of().float().pow(2).sum(-1) * weights).sum().backward()

    for mode in ("score", "train"):
        runs = {name: (lambda h=hidden_of: torch.no_grad()(h)()) if mode == "score" else (lambda h=hidden_of: train(h))
                for name, hidden_of in variants.items()}
        record = {"device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(), "mode": mode,
                  "shape": shape, "spread": args.spread, "tokens": int(lengths.sum()),
                  "padding_ratio": batch["input_ids"].numel() / int(lengths.sum())}
        for name, run in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            run()  # warm-up (and the peak memory)
            if device.type == "cuda":
                record[f"{name}_peak_bytes"] = torch.cuda.max_memory_allocated() - base
        for name, ms in _alternating_ms(runs, device, args.repeats).items():
            record[f"{name}_ms"] = ms
        record["speedup"] = record["masked_ms"] / record["fdivctl_ms"]
        if mode == "score":
            with torch.no_grad():
                record["max_abs_diff"] = float((variants["masked"]() - variants["fdivctl"]()).abs().max())
        model.zero_grad(set_to_none=True)
        print(json.dumps(record), flush=True)


def _alternating_ms(runs: dict, device: torch.device, repeats: int) -> dict[str, float]:
    """Each run's median milliseconds over ``repeats`` rounds that time every run once in turn (a machine whose
    speed drifts affects them alike)."""
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(median_ms(run, device, 1, warm_up=False))
    return {name: statistics.median(t) for name, t in times.items()}


if __name__ == "__main__":
    main()
