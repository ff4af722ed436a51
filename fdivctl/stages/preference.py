"""``train --algo fdpo``: preference pairs, f-DPO loss (:mod:`fdivctl.objectives.fdpo`).

Pairs: a Parquet table with text columns ``prompt``, ``chosen``, ``rejected``
(the prompt tokenized with the tokenizer's special tokens, the responses
without, as for any sequences table), or only ``chosen`` and ``rejected``
whose shared opening text is the prompt (TRL's implicit prompt), or
conversational pairs, messages
through the chat template in TRL's explicit (``prompt`` messages) or implicit
(whole ``chosen``/``rejected`` conversations) layout
(:func:`fdivctl.io.conversations.preference_pairs`), or the token ids
``prompt_token_ids``, ``chosen_token_ids``, ``rejected_token_ids`` of pairs
made from rollouts (``fdivctl pairs``), read as they are: the tokens sampled.  The reference log-probs
log π_ref(y|x) of both responses come from the columns ``ref_chosen_logp``
and ``ref_rejected_logp`` (or TRL's ``ref_chosen_logps`` and
``ref_rejected_logps``) when the table has them; otherwise they are
computed once with the initial policy (under no_grad) and cached in
``OUT/fdivctl_run/reference_logprobs.parquet``, which a resumed run reuses.
``--nll-coef`` adds RPO's per-token NLL of the chosen responses (:func:`fdivctl.objectives.fdpo.fdpo_loss`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from fdivctl import divergences, engine
from fdivctl.errors import UserError
from fdivctl.io import conversations
from fdivctl.io.checkpoints import load_causal_lm, load_tokenizer, model_limits
from fdivctl.io.lm_head import LMHead
from fdivctl.io.hashing import tokenizer_hash
from fdivctl.io.sequences import (
    Sequences,
    check_max_length,
    cut_counts,
    int_list_column,
    kept_rows,
    sequences_from_table,
    text_column,
)
from fdivctl.io.tables import provenance, read_table, require_columns, require_finite, require_no_nulls, write_table
from fdivctl.objectives.fdpo import FDPO_DIVERGENCES, fdpo_loss
from fdivctl.training import distributed
from fdivctl.training.checkpoint import has_state, run_dir
from fdivctl.training.loop import LoopOptions, check_fresh_output, run_loop
from fdivctl.training.lora import weights_to_load
from fdivctl.training.run_settings import begin_run, run_settings

REFERENCE_CACHE = "reference_logprobs.parquet"


@dataclass
class FDPOOptions:
    divergence: str = "rkl"
    beta: float = 0.1
    nll_coef: float = 0.0  # α of RPO's NLL term on the chosen responses (0: f-DPO alone)
    dtype: str = "auto"
    device: str = "auto"
    chat: bool = False  # prompts through the chat template
    max_length: int | None = None  # each response cut so that prompt + response hold this many tokens
    allow_tokenizer_mismatch: bool = False  # token-id pairs made with another tokenizer (unsafe)
    loop: LoopOptions = field(default_factory=LoopOptions)


REFERENCE_COLUMNS = ("ref_chosen_logp", "ref_rejected_logp")
#: the same columns as TRL's DPOTrainer names them (``precompute_ref_log_probs``), read when ours are absent
TRL_REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
#: a pairs table's exact token ids (``fdivctl pairs`` of rollouts), read in place of its text
TOKEN_COLUMNS = ("prompt_token_ids", "chosen_token_ids", "rejected_token_ids")


def _pairs(path: Path, tokenizer, chat: bool,
           allow_tokenizer_mismatch: bool = False) -> tuple[Sequences, Sequences, pa.Table]:
    """The (chosen, rejected) sequences of a pairs table, row for row, and the table (reference columns named as
    :data:`REFERENCE_COLUMNS`): by token ids when it holds them (:data:`TOKEN_COLUMNS`), else by text or messages."""
    table = _with_reference_columns(read_table(path), path)
    if all(name in table.column_names for name in TOKEN_COLUMNS):
        sides = _token_sides(table, path, tokenizer, chat, allow_tokenizer_mismatch)
    else:
        sides = _text_sides(table, path, tokenizer, chat)
    for side, seqs in zip(("chosen", "rejected"), sides):
        for row in range(len(seqs)):
            if len(seqs.completion_tokens[row]) == 0:
                raise UserError(f"{path}: row {row} has an empty {side} response")
            seqs.first_scored(row, include_prompt=False)
    return sides[0], sides[1], table


def _with_reference_columns(table: pa.Table, path: Path) -> pa.Table:
    """``table`` with its reference log-prob columns checked (both or neither, finite) and named ours."""
    names = REFERENCE_COLUMNS if any(n in table.column_names for n in REFERENCE_COLUMNS) else TRL_REFERENCE_COLUMNS
    given = [name for name in names if name in table.column_names]
    if len(given) == 1:
        raise UserError(f"{path}: has {given[0]} but not {(set(names) - set(given)).pop()}: give both "
                        "reference log-prob columns, or neither (the initial policy's are computed then)")
    for name in given:
        require_finite(path, name, table.column(name))
    if given and names is TRL_REFERENCE_COLUMNS:
        table = table.rename_columns([dict(zip(names, REFERENCE_COLUMNS)).get(n, n) for n in table.column_names])
    return table


def _token_sides(table: pa.Table, path: Path, tokenizer, chat: bool,
                 allow_tokenizer_mismatch: bool) -> list[Sequences]:
    """The sides of a pairs table that holds token ids (``fdivctl pairs`` of rollouts): the ids that were sampled,
    checked against the policy's tokenizer when the table's provenance names the one that made them."""
    if chat:
        raise UserError(f"{path}: --chat wraps text prompts in the chat template, and these pairs hold token ids "
                        "(encoded when they were sampled: give --chat to that rollout instead)")
    keys = [str(row) for row in range(table.num_rows)]
    prompts = int_list_column(table, "prompt_token_ids", path)
    sides = [Sequences(keys, [0] * len(keys), prompts, int_list_column(table, f"{side}_token_ids", path),
                       provenance(path).get("tokenizer_hash")) for side in ("chosen", "rejected")]
    sides[0].check_tokenizer(path, tokenizer_hash(tokenizer), "policy", allow_tokenizer_mismatch)
    return sides


def _text_sides(table: pa.Table, path: Path, tokenizer, chat: bool) -> list[Sequences]:
    """The sides of a pairs table of text or messages (TRL's preference layouts)."""
    require_columns(table, path, ["chosen", "rejected"], " (preference pairs)")
    if any(conversations.is_messages_column(table, c) for c in ("prompt", "chosen", "rejected")
           if c in table.column_names):
        for column in ("prompt", "chosen", "rejected"):
            if column in table.column_names:
                require_no_nulls(path, column, table.column(column))
        pairs = conversations.preference_pairs(table, path, tokenizer)
        keys = [str(row) for row in range(table.num_rows)]
        sides = []
        for side in ("chosen", "rejected"):
            prompts, responses = ([np.asarray(ids, dtype=np.int64) for ids in part] for part in pairs[side])
            sides.append(Sequences(keys, [0] * len(keys), prompts, responses, None))
        return sides
    texts = {column: text_column(table, column, path) for column in ("chosen", "rejected")}
    texts["prompt"] = text_column(table, "prompt", path) if "prompt" in table.column_names else \
        _shared_prompts(texts, path)
    return [sequences_from_table(pa.table({"prompt": texts["prompt"], "completion": texts[side]}), path, tokenizer,
                                 chat) for side in ("chosen", "rejected")]


def _shared_prompts(texts: dict[str, list[str]], path: Path) -> list[str]:
    """TRL's implicit-prompt text pairs (no ``prompt`` column; Anthropic HH's layout): each row's prompt is the
    text ``chosen`` and ``rejected`` open with, less a space it ends with (TRL's ``extract_prompt``), and
    ``texts["chosen"]``/``texts["rejected"]`` become the rest."""
    prompts = []
    for row, (chosen, rejected) in enumerate(zip(texts["chosen"], texts["rejected"])):
        shared = conversations.shared_opening(chosen, rejected)
        if shared and chosen[shared - 1] == " ":
            shared -= 1
        if shared == 0:
            raise UserError(f"{path}: row {row}: chosen and rejected open with different text, so they share no "
                            "prompt: give a prompt column")
        prompts.append(chosen[:shared])
        texts["chosen"][row], texts["rejected"][row] = chosen[shared:], rejected[shared:]
    return prompts


def sequence_logprobs(lm: LMHead, seqs: Sequences, rows: list[int], pad_id: int) -> torch.Tensor:
    """``[len(rows)]`` log π(y|x): the sum of the response tokens' log-probs, through the chunked engine."""
    device = lm.weight.device
    batch = seqs.batch(rows, pad_id, device=device)
    per_token = engine.token_outputs(lm.hidden(batch), lm.weight, bias=lm.bias, token_ids=batch["token"],
                                     softcap=lm.softcap).logprob
    return torch.zeros(len(rows), dtype=per_token.dtype, device=device).index_add(0, batch["batch_index"], per_token)


def _reference_logprobs(table: pa.Table, load_reference: Callable[[], object], chosen: Sequences,
                        rejected: Sequences, pad_id: int, cache: Path, batch_size: int) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """log π_ref of both responses: from the table's columns, the cache, or computed once (then cached)."""
    if all(name in table.column_names for name in REFERENCE_COLUMNS):  # checked by _pairs
        source = table
    elif cache.exists():
        source = read_table(cache)
    else:
        lm = LMHead.of(load_reference(), "reference")
        values = {}
        with torch.no_grad():
            for name, seqs in (("ref_chosen_logp", chosen), ("ref_rejected_logp", rejected)):
                values[name] = np.zeros(len(seqs))
                for rows in seqs.by_length(range(len(seqs)), batch_size):
                    values[name][rows] = sequence_logprobs(lm, seqs, rows, pad_id).cpu().double().numpy()
        source = pa.table({k: pa.array(v, pa.float64()) for k, v in values.items()})
        if distributed.is_main():
            write_table(cache, source, {"stage": "fdpo reference log-probs", "pairs": len(chosen)})
    as_tensor = lambda name: torch.tensor(source.column(name).to_pylist(), dtype=torch.float64)  # noqa: E731
    return as_tensor("ref_chosen_logp"), as_tensor("ref_rejected_logp")


def run_fdpo(policy: Path, pairs: Path, out: Path, opts: FDPOOptions,
             on_step: Callable[[int, int, dict], None] | None = None) -> dict:
    """Train ``policy`` on preference pairs with the f-DPO loss; checkpoint into ``out``.

    Under torchrun every rank computes the reference log-probs (before sharding), rank 0 caches them.
    """
    world = distributed.init_world(opts.loop.dist_backend, opts.device)
    try:
        divergence = divergences.parse(opts.divergence)
    except ValueError as err:
        raise UserError(f"--divergence: {err}") from None
    if divergence.name not in FDPO_DIVERGENCES:
        raise UserError(f"--algo fdpo takes --divergence {', '.join(FDPO_DIVERGENCES)}; got {divergence.name}")
    if not opts.beta > 0:
        raise UserError("--beta must be > 0")
    if not 0 <= opts.nll_coef < math.inf:
        raise UserError(f"--nll-coef must be ≥ 0 and finite; got {opts.nll_coef}")
    check_max_length(opts.max_length)
    check_fresh_output(out, opts.loop.resume)
    begin_run(out, opts.loop, run_settings(opts, policy=Path(policy), pairs=Path(pairs)))
    distributed.barrier(world)  # every rank has seen OUT before rank 0 writes into it
    tokenizer = load_tokenizer(policy, "policy")
    chosen, rejected, table = _pairs(pairs, tokenizer, opts.chat, opts.allow_tokenizer_mismatch)
    truncated = dropped = 0
    if opts.max_length is not None:  # a pair's two sides share their prompt: a row is dropped from both or neither
        (cut_w, full), (cut_l, _) = chosen.truncate(opts.max_length), rejected.truncate(opts.max_length)
        truncated, dropped = len(set(cut_w) | set(cut_l)), len(full)
        if (truncated or dropped) and all(name in table.column_names for name in REFERENCE_COLUMNS):
            raise UserError(f"{pairs}: --max-length {opts.max_length} cuts or drops {truncated + dropped} pairs, "
                            "and the table's reference log-probs are of the whole responses: drop those columns "
                            "(the initial policy's are computed then) or --max-length")
        if full:
            keep = kept_rows(len(chosen), full, pairs, opts.max_length, "pair")
            chosen, rejected, table = chosen.take(keep), rejected.take(keep), table.take(keep)
    limits = model_limits((policy, "policy"))
    chosen.check_fits(pairs, limits)
    rejected.check_fits(pairs, limits)
    resume_from = out if opts.loop.resume and has_state(out) else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model = load_causal_lm(weights_to_load(policy, resume_from, opts.loop.lora), opts.dtype, opts.device,
                           "policy")
    initial = (lambda: model) if resume_from is None else (  # noqa: E731 - the policy is π_ref before training
        lambda: load_causal_lm(policy, opts.dtype, opts.device, "reference"))
    ref_chosen, ref_rejected = _reference_logprobs(table, initial, chosen, rejected, pad_id,
                                                   run_dir(out) / REFERENCE_CACHE, opts.loop.batch_size)
    model.train()
    lm = LMHead.of(model, "policy")

    def loss_fn(rows: list[int], step: int = 0, total: int = 1):
        device = lm.weight.device
        logp_w = sequence_logprobs(lm, chosen, rows, pad_id)
        logp_l = sequence_logprobs(lm, rejected, rows, pad_id)
        chosen_tokens = torch.tensor([len(chosen.completion_tokens[r]) for r in rows], dtype=logp_w.dtype,
                                     device=device)
        loss, figures = fdpo_loss(divergence, opts.beta, logp_w, logp_l, ref_chosen[rows].to(device, logp_w.dtype),
                                  ref_rejected[rows].to(device, logp_w.dtype), chosen_tokens, opts.nll_coef)
        figures["tokens"] = float(chosen_tokens.sum()) + float(sum(len(rejected.completion_tokens[r]) for r in rows))
        return loss, figures

    lengths = [len(chosen.prompt_tokens[r]) + max(len(chosen.completion_tokens[r]), len(rejected.completion_tokens[r]))
               for r in range(len(chosen))]  # a row's cost: its prompt and its longer response
    summary = run_loop(model, tokenizer, len(chosen), loss_fn, out, opts.loop, on_step, lengths=lengths)
    return summary if opts.max_length is None else {**summary, **cut_counts(truncated, dropped)}
