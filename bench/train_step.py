"""One GRPO update's loss computation, fdivctl vs TRL's GRPOTrainer recipe vs naive PyTorch, side by side.

Same model, same batch (one prompt, a group of 8 responses of ``--length``
tokens, random rewards), same reference model; forward + backward of the
policy loss, no optimizer step:

* ``fdivctl``: :class:`fdivctl.stages.policy_update.PolicyUpdate` — hidden
  states through the chunked engine: per-token log-prob, entropy and the
  closed-form reverse KL to the reference over the whole vocabulary
  (``--div-estimator full``), never holding ``[tokens, V]`` logits;
* ``trl``: what ``trl.GRPOTrainer`` (1.16) runs: both models patched with
  its fused LM head (``trl.trainer.utils.add_fused_lm_head``, as
  ``GRPOTrainer.__init__`` does: the policy with entropy), called with
  ``labels`` and ``fused_lm_head=True`` as ``_get_per_token_logps_and_entropies``
  does (``ChunkedLogProbFunction``: [4096 tokens × 32768 ids] tiles in the
  model's dtype, a Triton fold on CUDA, the tiles recomputed in the
  backward), then ``_compute_loss``'s lines for the default ``dapo`` loss:
  token-level ratio, clip 0.2 / 0.2, the k3 KL on the sampled tokens with
  β = 0.04 (TRL has no full-vocabulary estimator; k3 is cheaper), the mean
  over the completion tokens (only when ``trl`` is importable).  Result lines
  without ``trl_path`` ran the models' full logits through
  ``selective_log_softmax_and_entropy`` instead, which GRPOTrainer no longer
  does;
* ``naive``: full logits of both models, ``log_softmax``, the exact reverse
  KL summed over the vocabulary, clipped surrogate.

Prints one JSON object per shape with ``tokens``, ``trl_path`` (what the TRL column ran), ``*_s`` (median of
``--repeats``), ``*_tokens_per_s``, ``*_peak_bytes`` (CUDA:
``max_memory_allocated`` above the models and inputs; CPU: one step of each
variant in a fresh worker process, its RSS high-water mark above the RSS once
the models and inputs exist, :mod:`cpu_memory`) and the ratios
``tokens_per_s_ratio_vs_trl`` / ``_vs_naive`` (fdivctl ÷ other) and
``peak_memory_ratio_vs_trl`` / ``_vs_naive`` (fdivctl ÷ other).  With
``--chunk-sizes 512,1024`` fdivctl is also measured at those head chunk sizes
(``train --chunk-size``): one ``chunk_sweep`` entry each, with its own time,
memory and ratios.  ``fdivctl_k3_*`` and ``k3_*_ratio_vs_*``: fdivctl with
``--div-estimator k3``, TRL's estimator (the reference's log-prob of each
sampled token only), for a like-for-like reading beside the ``full`` one.

With ``--grad-checkpointing`` the policy recomputes each decoder layer in the
backward pass, in every variant (the models are shared): what ``GRPOConfig``
does by default (``gradient_checkpointing=True``) and ``train
--grad-checkpointing`` does.  The layers' saved activations then no longer
fill most of each variant's peak, and the loss heads' own memory shows.  The
result line's ``grad_checkpointing`` says which was measured.

Usage::

    python bench/train_step.py --quick                       # CPU, small model
    python bench/train_step.py --device cuda --dtype bf16    # H100: hidden 2048, vocab 151936, 8 × 1024 tokens
    python bench/train_step.py --device cuda --dtype bf16 --chunk-sizes 512,1024,2048,4096
    python bench/train_step.py --device cuda --dtype bf16 --profile profile.txt  # + where each variant's time goes
    python bench/train_step.py --device cuda --dtype bf16 --grad-checkpointing   # TRL GRPOConfig's default
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from fdivctl import tiny
from fdivctl.io.lm_head import LMHead
from fdivctl.objectives import grpo
from fdivctl.stages.policy_update import PolicyUpdate, StepScale
from fdivctl.stages.rl_data import ReferencePolicy, ScoredRollouts
from fdivctl.stages.rl_options import RLOptions
from fdivctl.stages.signals import FrozenModel
from fdivctl.training.loop import LoopOptions, enable_activation_checkpointing

from cpu_memory import print_step_peak, worker_peak  # bench/cpu_memory.py, profiling.py, step_options.py: here
from profiling import profile_table
from step_options import step_parser

try:
    from trl.trainer.utils import add_fused_lm_head
except ImportError:  # the TRL column is left out
    add_fused_lm_head = None

GROUP = 8
#: what the ``trl`` column runs (results recorded before this field ran TRL's full-logit utilities instead)
TRL_PATH = "GRPOTrainer 1.16: add_fused_lm_head (ChunkedLogProbFunction) + _compute_loss, dapo, k3 beta 0.04"
SHAPES = {
    "quick": [dict(hidden=256, layers=2, vocab=32768, length=128)],
    "cpu": [dict(hidden=512, layers=2, vocab=32768, length=256)],
    "cuda": [dict(hidden=2048, layers=4, vocab=151936, length=1024), dict(hidden=2048, layers=4, vocab=151936,
                                                                          length=2048)],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class _Tokenizer:
    pad_token_id = 0


def _model(shape, dtype, device, seed):
    return tiny.random_lm(shape["hidden"], shape["layers"], shape["vocab"], seed).to(device=device, dtype=dtype)


def _batch(shape, seed):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, shape["vocab"], (32,), generator=g).tolist()
    completions = torch.randint(1, shape["vocab"], (GROUP, shape["length"]), generator=g).tolist()
    table = pa.table({
        "prompt_id": ["p0"] * GROUP, "sample_idx": list(range(GROUP)),
        "prompt_token_ids": pa.array([prompt] * GROUP, pa.list_(pa.int32())),
        "completion_token_ids": pa.array(completions, pa.list_(pa.int32())),
        "completion_logprobs": pa.array((-torch.rand(GROUP, shape["length"], generator=g) * 5).tolist(),
                                        pa.list_(pa.float32())),
        "reward": pa.array(torch.randint(0, 2, (GROUP,), generator=g).float().tolist(), pa.float32()),
    })
    return ScoredRollouts.from_table(table, "bench")


def _fdivctl(policy, reference, data, device, chunk_size=None, kernel="auto", estimator="full"):
    opts = RLOptions(algo="grpo", divergence="rkl", div_estimator=estimator, micro_batch_size=GROUP,
                     chunk_size=chunk_size, loop=LoopOptions()).resolve()
    update = PolicyUpdate(policy, _Tokenizer(), opts, ReferencePolicy(reference, None, "tail"))
    update.head_options["kernel"] = kernel  # the engine's path (chunk_launches.py: "triton" under the interpreter)
    credit, rows, _ = update.advantages(data, 1.0, None)
    micro = update._micro(data, credit, rows, StepScale(int(data.lengths[rows].sum()), len(rows),
                                                        div_coef=opts.div_coef), 1.0)

    def step():
        loss, _ = micro()
        loss.backward()

    return step


def _full_logits_inputs(data, device):
    """The batch of the full-logit recipes, with the padding mask they pass to the model, and its old log-probs
    and advantages per token."""
    seqs = data.seqs
    batch = {k: v.to(device) for k, v in seqs.batch(list(range(len(seqs))), 0).items()}
    lengths = torch.tensor(seqs.lengths(), device=device)
    batch["attention_mask"] = (torch.arange(batch["input_ids"].shape[1], device=device) < lengths[:, None]).long()
    old = torch.from_numpy(np.concatenate(data.old_logprobs)).to(device)
    adv = grpo.group_advantages(data.rewards, data.groups).repeat_interleave(data.lengths).to(device)
    return batch, old, adv


def _trl(policy, reference, data, device):
    # GRPOTrainer.__init__: the policy's fused head also returns the entropy, the reference's only log-probs; both
    # forwards keep their original behaviour without fused_lm_head=True (the naive variant's calls)
    add_fused_lm_head(policy, outputs=("log_probs", "entropy"))
    add_fused_lm_head(reference)
    batch, old, adv = _full_logits_inputs(data, device)
    rows, length = len(data.lengths), int(data.lengths[0])
    assert (data.lengths == length).all(), "the TRL column takes completions of one length, as _batch makes"
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    labels = input_ids.masked_fill(attention_mask == 0, -100)  # _get_per_token_logps_and_entropies
    labels[:, :-length] = -100
    old, adv = old.view(rows, length), adv.view(rows, length)[:, :1]  # one advantage per completion

    def step():
        out = policy(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
        logps, _entropy = out.log_probs[:, -length:], out.entropy[:, -length:]
        with torch.no_grad():
            ref_logps = reference(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                  fused_lm_head=True).log_probs[:, -length:]
        # _compute_loss, loss_type "dapo" (the default), beta 0.04, epsilon 0.2
        coef_1 = torch.exp(logps - old)
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        coef_2 = torch.clamp(coef_1, 1 - 0.2, 1 + 0.2)
        per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv) + 0.04 * kl
        per_token_loss.mean().backward()

    return step


def _naive(policy, reference, data, device):
    batch, old, adv = _full_logits_inputs(data, device)
    index = (batch["batch_index"], batch["position"])

    def step():
        log_q = torch.log_softmax(policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                                  .logits[index].float(), -1)
        with torch.no_grad():
            log_p = torch.log_softmax(reference(input_ids=batch["input_ids"],
                                                attention_mask=batch["attention_mask"]).logits[index].float(), -1)
        logps = log_q.gather(-1, batch["token"][:, None]).squeeze(-1)
        kl = (log_q.exp() * (log_q - log_p)).sum(-1)
        surrogate, _ = grpo.clipped_surrogate(logps, old, adv, 0.2, 0.2)
        (surrogate + 0.04 * kl).mean().backward()

    return step


def _ratios(result: dict, ours: str, other: str, prefix: str = "") -> dict:
    """``ours`` ÷ ``other`` from ``result``'s ``*_s`` and ``*_peak_bytes``: tokens/s (higher is better) and peak
    memory (lower is better), named ``{prefix}tokens_per_s_ratio_vs_{other}`` and ``…peak_memory_ratio…``."""
    ratios = {f"{prefix}tokens_per_s_ratio_vs_{other}": result[f"{other}_s"] / result[f"{ours}_s"]}
    if result[f"{ours}_peak_bytes"] is not None:
        ratios[f"{prefix}peak_memory_ratio_vs_{other}"] = result[f"{ours}_peak_bytes"] / result[f"{other}_peak_bytes"]
    return ratios


def _measure(step, policy, repeats, device):
    times, peak = [], None
    for i in range(repeats + 1):
        policy.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        if i:  # the first run warms up
            times.append(time.perf_counter() - start)
    policy.zero_grad(set_to_none=True)
    return statistics.median(times), peak


def _profile(step, policy, device) -> str:
    """One more run of ``step`` under torch.profiler (:func:`profiling.profile_table`), gradients cleared around it."""
    policy.zero_grad(set_to_none=True)
    table = profile_table(step, device)
    policy.zero_grad(set_to_none=True)
    return table


def main() -> None:
    parser = step_parser(__doc__.split("\n")[0], list(DTYPES))
    parser.add_argument("--chunk-sizes", default="", help="also measure fdivctl at these token rows per head chunk "
                        "(train --chunk-size), e.g. 512,1024,2048: one chunk_sweep entry each, beside the default")
    parser.add_argument("--profile", default=None, help="write each variant's torch.profiler table (top 25 by self "
                        "device time) of one more step to this file, after the timed runs")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute the policy's decoder layers in "
                        "backward, in every variant (GRPOConfig's default; train --grad-checkpointing)")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # CPU memory worker: this variant ...
    parser.add_argument("--shape-index", type=int, default=0, help=argparse.SUPPRESS)  # ... of this shape
    args = parser.parse_args()
    profiles = []
    sweep = [int(c) for c in args.chunk_sizes.split(",") if c.strip()]
    device = torch.device(args.device)
    shapes = SHAPES["quick" if args.quick else device.type]
    for index, shape in enumerate(shapes):
        if args.only and index != args.shape_index:
            continue
        policy = _model(shape, DTYPES[args.dtype], device, 0).train()
        if args.grad_checkpointing:
            enable_activation_checkpointing(policy)
        reference = _model(shape, DTYPES[args.dtype], device, 1)
        frozen = FrozenModel(LMHead.of(reference, "reference"))
        reference.requires_grad_(False)
        data = _batch(shape, 2)
        tokens = int(data.lengths.sum())
        result = {"shape": {**shape, "group": GROUP}, "tokens": tokens, "device": str(device), "dtype": args.dtype,
                  "grad_checkpointing": args.grad_checkpointing}
        variants = {"fdivctl": _fdivctl(policy, frozen, data, device), "naive": _naive(policy, reference, data, device),
                    "fdivctl_k3": _fdivctl(policy, frozen, data, device, estimator="k3")}
        variants.update({f"chunk{c}": _fdivctl(policy, frozen, data, device, c) for c in sweep})
        if add_fused_lm_head is not None:
            variants["trl"] = _trl(policy, reference, data, device)
            result["trl_path"] = TRL_PATH
        if args.only:
            print_step_peak(variants[args.only])
            return
        for name, step in variants.items():
            seconds, peak = _measure(step, policy, args.repeats, device)
            if device.type == "cpu":
                peak = worker_peak(__file__, ["--only", name, "--shape-index", str(index), "--dtype", args.dtype,
                                              "--chunk-sizes", args.chunk_sizes] + (["--quick"] if args.quick else [])
                                   + (["--grad-checkpointing"] if args.grad_checkpointing else []))
            result[f"{name}_s"] = seconds
            result[f"{name}_tokens_per_s"] = tokens / seconds
            result[f"{name}_peak_bytes"] = peak
            if args.profile:
                profiles.append(f"== {name}, shape {shape}, {tokens} tokens, {args.dtype} ==\n"
                                f"{_profile(step, policy, device)}\n")
        others = [other for other in ("trl", "naive") if f"{other}_s" in result]
        for other in others:
            result.update(_ratios(result, "fdivctl", other))
            result.update(_ratios(result, "fdivctl_k3", other, prefix="k3_"))
        result["chunk_sweep"] = []
        for c in sweep:
            entry = {"chunk_size": c, **{k: result.pop(f"chunk{c}_{k}") for k in ("s", "tokens_per_s", "peak_bytes")}}
            for other in others:
                entry.update(_ratios({**result, **{f"chunk_{k}": v for k, v in entry.items()}}, "chunk", other))
            result["chunk_sweep"].append(entry)
        print(json.dumps(result), flush=True)
        del policy, reference, frozen, variants
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.profile:
        Path(args.profile).write_text("".join(profiles))


if __name__ == "__main__":
    main()
