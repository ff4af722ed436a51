"""KL(run ‖ model) per sequence, estimated from a run's own samples (``eval --kl-model``).

A rollout file records, for every sampled token, its log-prob under the
policy that sampled it at the sampling temperature T
(``completion_logprobs``).  Scoring the same tokens with ``model`` at T gives
log p(y_t), and

    KL(π_T ‖ p_T) = E_{y ~ π_T} Σ_t [log π_T(y_t | y_<t) − log p_T(y_t | y_<t)]

is estimated by the mean over the samples of that sum (the k1 estimator at the
sequence level, unbiased), with its standard error.  Samples drawn with
top-p or top-k truncation come from another distribution than π_T, so such
runs are refused; greedy runs have no distribution to compare.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch

from fdivctl.errors import UserError
from fdivctl.io.checkpoints import ModelLimits
from fdivctl.io.sequences import sampled_logprobs, sequences_from_table
from fdivctl.io.tables import provenance, read_table, require_columns
from fdivctl.stages.signals import FrozenModel

BATCH_ROWS = 16


def sampling_temperature(path: Path, record: dict) -> float:
    """The run's sampling temperature from its provenance ``record`` (1 without one); refuses truncated or greedy
    sampling."""
    sampling = record.get("sampling") or {}
    temperature = float(sampling.get("temperature", 1.0))
    if not temperature > 0:
        raise UserError(f"{path}: sampled greedily (temperature 0): there is no distribution to measure a KL of")
    if sampling.get("top_p", 1.0) < 1 or sampling.get("top_k", 0) > 0:
        raise UserError(f"{path}: sampled with top-p {sampling.get('top_p')} / top-k {sampling.get('top_k')}: its "
                        "recorded log-probs are not of the distribution it sampled, so its KL is not measured")
    return temperature


def kl_figures(gaps: list[float]) -> dict[str, float | None]:
    """``{"kl": mean, "kl_stderr": standard error (None for one sample), "kl_samples": n}`` of per-sequence
    log-ratios log π(y) − log p(y): the estimate of KL(π ‖ p) in nats per sequence."""
    n = len(gaps)
    stderr = float(np.std(gaps, ddof=1) / math.sqrt(n)) if n > 1 else None
    return {"kl": float(np.mean(gaps)), "kl_stderr": stderr, "kl_samples": n}


@torch.no_grad()
def sequence_log_ratios(path: Path, model: FrozenModel, tokenizer_hash: str, limits: ModelLimits,
                        pad_id: int) -> dict[str, list[float]]:
    """Per prompt_id, each sampled sequence's log π_T(y) − log p_T(y) (:func:`kl_figures` averages them)."""
    table = read_table(path)
    require_columns(table, path, ["prompt_token_ids", "completion_token_ids", "completion_logprobs"],
                    " (--kl-model reads the token ids and log-probs that `fdivctl rollout` records)")
    if "greedy" in table.column_names:
        table = table.filter(pc.invert(pc.fill_null(table.column("greedy"), False)))
    record = provenance(path)
    temperature = sampling_temperature(path, record)
    seqs = sequences_from_table(table, path)
    seqs.tokenizer_hash = record.get("tokenizer_hash")
    seqs.check_tokenizer(path, tokenizer_hash, "--kl-model", allow_mismatch=False)
    seqs.check_fits(path, limits)
    sampled = sampled_logprobs(table, path, seqs, np.float64)
    device = model.weight.device
    gaps: dict[str, list[float]] = {}
    for rows in seqs.by_length(range(len(seqs)), BATCH_ROWS):
        batch = seqs.batch(rows, pad_id, device=device)
        logp = model.token_logprobs(model.hidden(batch), batch["token"], temperature).double()
        per_row = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add(0, batch["batch_index"], logp)
        for i, r in enumerate(rows):
            gaps.setdefault(seqs.prompt_ids[r], []).append(float(sampled[r].sum()) - float(per_row[i]))
    return gaps
