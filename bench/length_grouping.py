"""SFT on sequences of mixed lengths, with and without ``--group-by-length``, side by side in one run.

The same model, data, seed and steps (``fdivctl train --algo sft``, through :func:`fdivctl.stages.distill.run_distill`
with ``loss="ce"``); the sequences' lengths are spread uniformly over ``--min-length``..``--max-length``.  Prints one
JSON object with each variant's wall time (``*_s``: model load included, the same for both), real tokens per second
and padding ratio (tokens the batches pad to ÷ real tokens, from the run's own batch plan), and
``tokens_per_s_ratio`` (grouped ÷ random).

    python bench/length_grouping.py --quick
    python bench/length_grouping.py --device cuda --hidden 1024 --layers 8 --steps 50
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch

from fdivctl import tiny
from fdivctl.io.tables import write_table
from fdivctl.stages.distill import DistillOptions, run_distill
from fdivctl.training.loop import LoopOptions, batches_for_step


def _data(path: Path, n: int, vocab: int, low: int, high: int) -> list[int]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(low, high + 1, (n,), generator=g).tolist()
    write_table(path, pa.table({
        "prompt_id": [f"p{i}" for i in range(n)],
        "prompt_token_ids": pa.array([torch.randint(3, vocab, (8,), generator=g).tolist()] * n, pa.list_(pa.int32())),
        "completion_token_ids": pa.array([torch.randint(3, vocab, (m - 8,), generator=g).tolist() for m in lengths],
                                         pa.list_(pa.int32())),
    }), {})
    return lengths


def _planned_tokens(lengths: list[int], steps: int, loop: LoopOptions) -> tuple[int, int]:
    """(real tokens, tokens the batches pad to) of the run's first ``steps`` steps, from its own batch plan."""
    real = padded = 0
    for step in range(steps):
        for rows in batches_for_step(len(lengths), step, loop, lengths):
            real += sum(lengths[r] for r in rows)
            padded += len(rows) * max(lengths[r] for r in rows)
    return real, padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="a smaller model and fewer steps")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--sequences", type=int, default=1024)
    parser.add_argument("--min-length", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.steps, args.max_length = 128, 2, 8, 256
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer = tiny.train_tokenizer(tmp / "tok")
        model = tmp / "model"
        tiny.make_model(model, tokenizer, hidden=args.hidden, layers=args.layers, max_positions=args.max_length)
        lengths = _data(tmp / "data.parquet", args.sequences, len(tokenizer), args.min_length, args.max_length)
        result = {"device": args.device, "model": {"hidden": args.hidden, "layers": args.layers},
                  "sequences": args.sequences, "lengths": [args.min_length, args.max_length],
                  "batch_size": args.batch_size, "steps": args.steps}
        for name, grouped in (("random", False), ("grouped", True)):
            loop = LoopOptions(batch_size=args.batch_size, max_steps=args.steps, group_by_length=grouped)
            real, padded = _planned_tokens(lengths, args.steps, loop)
            start = time.perf_counter()
            run_distill(model, tmp / name, tmp / "data.parquet", DistillOptions(loss="ce", device=args.device,
                                                                                loop=loop))
            seconds = time.perf_counter() - start
            result.update({f"{name}_s": seconds, f"{name}_tokens_per_s": real / seconds,
                           f"{name}_padding_ratio": padded / real})
        result["tokens_per_s_ratio"] = result["grouped_tokens_per_s"] / result["random_tokens_per_s"]
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
