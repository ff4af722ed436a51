"""One distillation step's loss, fdivctl vs TRL's GKDTrainer loss path, side by side on the same models and batch.

* ``fdivctl``: what ``fdivctl distill --teacher`` runs per micro-batch
  (:func:`fdivctl.objectives.kd.kd_loss`): the student's hidden states and the
  teacher's hidden + head go through the chunked engine; no ``[tokens, V]``
  logits of either model are held;
* ``trl``: ``trl.experimental.gkd.GKDTrainer.generalized_jsd_loss`` on the two
  models' full logits (completion positions labelled, prompt masked with −100);
* ``trl_chunked``: the loss of TRL's non-experimental ``DistillationTrainer``
  (1.16: ``trl.trainer.distillation_trainer._chunked_divergence_loss``, its
  ``ChunkedDivergenceFunction`` over the two models' hidden states and heads in
  tiles, no ``[tokens, V]`` logits), when the installed TRL has it.

Both compute the generalized JSD with β = 0.5 (TRL's convention, which the
registry's ``jsd`` follows); before timing the script checks fdivctl's value
against TRL's formula on fp32 logits (in bf16 TRL's own value drifts by a few
per cent: both are printed).  Prints one JSON object per shape with ``*_s`` (median of
``--repeats`` forward + backward), ``*_tokens_per_s``, ``*_peak_bytes`` and
``tokens_per_s_ratio`` (TRL time ÷ fdivctl time) / ``peak_memory_ratio``
(fdivctl ÷ TRL), and the same against the chunked trainer as
``tokens_per_s_ratio_vs_trl_chunked`` / ``peak_memory_ratio_vs_trl_chunked``.
Peak memory: on CUDA ``max_memory_allocated`` above the
models and inputs; on the CPU each variant runs once more in a fresh
subprocess (``--only``, :mod:`cpu_memory`): the RSS high-water mark above the RSS once the models and inputs
exist.
Needs ``pip install trl`` (the ``bench`` extra).

Usage::

    python bench/distill_step.py --quick          # CPU
    python bench/distill_step.py --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from fdivctl import divergences, engine, tiny
from fdivctl.objectives.kd import KDBatch, kd_loss

from cpu_memory import print_step_peak, worker_peak  # bench/cpu_memory.py and step_options.py, beside this script
from step_options import step_parser

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.experimental.gkd import GKDTrainer  # noqa: E402

try:
    from trl.trainer.distillation_trainer import _chunked_divergence_loss
except ImportError:  # a TRL before its chunked DistillationTrainer: that column is left out
    _chunked_divergence_loss = None

SHAPES = {
    "quick": [dict(hidden=256, layers=2, vocab=32768, batch=8, prompt=32, completion=128)],
    "cpu": [dict(hidden=512, layers=2, vocab=32768, batch=8, prompt=64, completion=256)],
    "cuda": [dict(hidden=2048, layers=4, vocab=151936, batch=8, prompt=128, completion=1024)],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _model(shape, dtype, device, seed):
    return tiny.random_lm(shape["hidden"], shape["layers"], shape["vocab"], seed).to(device=device, dtype=dtype)


def _cpu_peak(name: str, args) -> int:
    return worker_peak(__file__, ["--only", name, "--dtype", args.dtype] + (["--quick"] if args.quick else []))


def main() -> None:
    parser = step_parser(__doc__.split("\n")[0], list(DTYPES))
    parser.add_argument("--only", choices=["fdivctl", "trl", "trl_chunked"], help=argparse.SUPPRESS)  # CPU memory
    args = parser.parse_args()
    device = torch.device(args.device)
    jsd = divergences.get("jsd", beta=0.5)
    for shape in SHAPES["quick" if args.quick else device.type]:
        _run_shape(shape, args, device, jsd)

def _run_shape(shape: dict, args, device: torch.device, jsd) -> None:
    """Build the models and batch of one shape, check the two losses agree, then time (and measure) both."""
    student = _model(shape, DTYPES[args.dtype], device, 0).train()
    teacher = _model(shape, DTYPES[args.dtype], device, 1).requires_grad_(False)
    g = torch.Generator().manual_seed(2)
    length = shape["prompt"] + shape["completion"]
    input_ids = torch.randint(0, shape["vocab"], (shape["batch"], length), generator=g).to(device)
    labels = input_ids.clone()
    labels[:, : shape["prompt"]] = -100
    # the positions whose hidden state predicts a completion token, and those tokens
    scored = torch.zeros(shape["batch"], length, dtype=torch.bool, device=device)
    scored[:, shape["prompt"] - 1 : -1] = True
    tokens = int(scored.sum())

    def ours():
        hidden = student.model(input_ids=input_ids).last_hidden_state[scored]
        with torch.no_grad():
            t_hidden = teacher.model(input_ids=input_ids).last_hidden_state[scored]
        target = engine.TeacherHead(t_hidden, teacher.lm_head.weight)
        loss, _ = kd_loss(KDBatch(hidden, input_ids[:, 1:][scored[:, :-1]], target), student.lm_head.weight,
                          None, jsd)
        return loss

    def trl(upcast: bool = False):
        logits = student(input_ids=input_ids).logits[:, :-1]
        with torch.no_grad():
            t_logits = teacher(input_ids=input_ids).logits[:, :-1]
        if upcast:
            logits, t_logits = logits.float(), t_logits.float()
        return GKDTrainer.generalized_jsd_loss(logits, t_logits, labels=labels[:, 1:], beta=0.5)

    def trl_chunked():
        hidden = student.model(input_ids=input_ids).last_hidden_state[:, :-1]
        with torch.no_grad():
            t_hidden = teacher.model(input_ids=input_ids).last_hidden_state[:, :-1]
        loss, _, _ = _chunked_divergence_loss(hidden, t_hidden, student.lm_head.weight, teacher.lm_head.weight,
                                              labels[:, 1:] != -100, beta=0.5)
        return loss

    variants = {"fdivctl": ours, "trl": trl}
    if _chunked_divergence_loss is not None:
        variants["trl_chunked"] = trl_chunked
    if args.only:  # one step in this fresh process: print the RSS high-water mark above the inputs' RSS
        print_step_peak(lambda: variants[args.only]().backward())
        return
    with torch.no_grad():  # the check is against TRL's formula on fp32 logits: in bf16 its own value drifts
        a, b, exact = float(ours()), float(trl()), float(trl(upcast=True))
        chunked = float(trl_chunked()) if "trl_chunked" in variants else None
    if abs(a - exact) > 1e-3 * max(1.0, abs(exact)):
        raise SystemExit(f"the two losses differ: fdivctl {a} vs TRL on fp32 logits {exact}")
    if chunked is not None and abs(chunked - exact) > 1e-2 * max(1.0, abs(exact)):
        raise SystemExit(f"TRL's chunked DistillationTrainer loss {chunked} differs from its GKD formula's {exact}")
    result = {"shape": shape, "tokens": tokens, "device": str(device), "dtype": args.dtype, "fdivctl_loss": a,
              "trl_loss": b, "trl_loss_fp32_logits": exact, "trl_chunked_loss": chunked}
    for name, fn in variants.items():
        times, peak = [], None
        for i in range(args.repeats + 1):
            student.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            fn().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - base
            if i:
                times.append(time.perf_counter() - start)
        result[f"{name}_s"] = statistics.median(times)
        result[f"{name}_tokens_per_s"] = tokens / result[f"{name}_s"]
        result[f"{name}_peak_bytes"] = peak if device.type == "cuda" else _cpu_peak(name, args)
    result["tokens_per_s_ratio"] = result["trl_s"] / result["fdivctl_s"]
    result["peak_memory_ratio"] = result["fdivctl_peak_bytes"] / result["trl_peak_bytes"]
    if "trl_chunked" in variants:
        result["tokens_per_s_ratio_vs_trl_chunked"] = result["trl_chunked_s"] / result["fdivctl_s"]
        result["peak_memory_ratio_vs_trl_chunked"] = result["fdivctl_peak_bytes"] / result["trl_chunked_peak_bytes"]
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
