"""``pairs``: preference pairs from scored rollouts, for ``train --algo fdpo``.

For each prompt, ``chosen`` is one of its samples of the highest reward and ``rejected`` one of the lowest, when
the two rewards differ by more than ``min_margin``: the best-versus-worst pairs of iterative DPO with a reward
model (Dong et al., "RLHF Workflow: From Reward Modeling to Online RLHF", 2024, arXiv 2405.07863, §3), and with
a 0/1 verifier a correct and an incorrect completion of the same prompt, sampled from the current model (Pang et
al., "Iterative Reasoning Preference Optimization", 2024, arXiv 2404.19733, §2.1).  A prompt whose samples all
score alike gives no pair.  With ``per_prompt`` K, up to K distinct (chosen, rejected) combinations of a prompt
are drawn, without replacement, from its best × worst samples (in ``sample_idx`` order), seeded by the run's seed
and the prompt id: the same pairs whatever the order of the file's rows.

The pairs keep the rollout's exact token ids (``prompt_token_ids``, ``chosen_token_ids``,
``rejected_token_ids``), which ``train --algo fdpo`` reads in place of the text, so the policy is trained on the
tokens it sampled (re-tokenizing a completion's text may give other ids); the text columns stay for reading.
"""

from __future__ import annotations

import itertools
import random
from collections import defaultdict
from pathlib import Path

import pyarrow as pa

from fdivctl.errors import UserError
from fdivctl.io.atomic import check_output_file
from fdivctl.io.hashing import file_sha256
from fdivctl.io.sequences import has_token_ids
from fdivctl.io.tables import provenance, read_table, require_columns, require_finite, require_no_nulls, write_table

#: a rollout's per-sample columns: a pair's side has its own, the prompt's other columns are carried once
PER_SAMPLE = ("sample_idx", "completion", "completion_token_ids", "completion_logprobs", "finish_reason", "reward",
              "correct", "verdict")
SIDES = ("chosen", "rejected")


def _draw(best: list[int], worst: list[int], count: int, rng: random.Random) -> list[tuple[int, int]]:
    """``count`` distinct (best, worst) combinations, uniformly without replacement (all of them when fewer)."""
    if len(best) * len(worst) <= count:
        return list(itertools.product(best, worst))
    chosen = rng.sample(range(len(best) * len(worst)), count)
    return [(best[i // len(worst)], worst[i % len(worst)]) for i in sorted(chosen)]


def make_pairs(scored: Path, out: Path, per_prompt: int = 1, min_margin: float = 0.0, seed: int = 0) -> dict:
    """Write the preference pairs of ``scored`` (rollouts with a ``reward``) to ``out``; return a summary."""
    if per_prompt < 1:
        raise UserError(f"--per-prompt must be ≥ 1, got {per_prompt}")
    if not min_margin >= 0:
        raise UserError(f"--min-margin must be ≥ 0, got {min_margin}")
    check_output_file(out)
    table = read_table(scored)
    require_columns(table, scored, ["prompt_id", "prompt", "completion", "reward"],
                    " (scored rollouts: fdivctl rollout, then fdivctl score)")
    for name in ("prompt_id", "prompt", "completion"):
        require_no_nulls(scored, name, table.column(name))
    require_finite(scored, "reward", table.column("reward"))
    rows_of: dict[str, list[int]] = defaultdict(list)
    for row, prompt_id in enumerate(table.column("prompt_id").to_pylist()):
        rows_of[str(prompt_id)].append(row)
    if "sample_idx" in table.column_names:  # each prompt's samples in their own order, whatever the file's
        sample_idx = table.column("sample_idx").to_pylist()
        for rows in rows_of.values():
            rows.sort(key=lambda r: sample_idx[r])
    rewards = table.column("reward").to_pylist()
    take: dict[str, list[int]] = {side: [] for side in SIDES}  # rows of each pair's sides
    paired = 0
    for prompt_id, rows in rows_of.items():
        high, low = max(rewards[r] for r in rows), min(rewards[r] for r in rows)
        if not high - low > min_margin:
            continue
        best = [r for r in rows if rewards[r] == high]
        worst = [r for r in rows if rewards[r] == low]
        paired += 1
        for good, bad in _draw(best, worst, per_prompt, random.Random(f"{seed}:{prompt_id}")):
            take["chosen"].append(good)
            take["rejected"].append(bad)
    if not take["chosen"]:
        raise UserError(f"{scored}: no pair: every prompt's samples score within --min-margin {min_margin:g} of "
                        "each other (sample more per prompt, or lower --min-margin)")
    pairs = _pair_table(table, take)
    source = provenance(scored)
    record = {"stage": "pairs", "source": str(Path(scored).resolve()), "source_sha256": file_sha256(scored),
              "per_prompt": per_prompt, "min_margin": min_margin, "seed": seed,
              **{k: source[k] for k in ("tokenizer_hash", "model_hash") if k in source}}
    write_table(out, pairs, record)
    margins = [rewards[good] - rewards[bad] for good, bad in zip(take["chosen"], take["rejected"])]
    return {"pairs": pairs.num_rows, "prompts": len(rows_of), "prompts_paired": paired,
            "mean_reward_margin": sum(margins) / len(margins)}


def _pair_table(table: pa.Table, take: dict[str, list[int]]) -> pa.Table:
    """One row per pair: the prompt's columns (from its chosen row), then each side's text, reward, sample index
    and token ids."""
    prompt_side = table.take(take["chosen"])
    columns = {name: prompt_side.column(name) for name in table.column_names if name not in PER_SAMPLE}
    with_ids = has_token_ids(table.column_names)
    for side in SIDES:
        rows = table.take(take[side])
        columns[side] = rows.column("completion")
        columns[f"{side}_reward"] = rows.column("reward")
        if "sample_idx" in table.column_names:
            columns[f"{side}_sample_idx"] = rows.column("sample_idx")
        if with_ids:
            columns[f"{side}_token_ids"] = rows.column("completion_token_ids")
    if not with_ids:
        columns.pop("prompt_token_ids", None)
    return pa.table(columns)
