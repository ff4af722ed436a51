"""DPH-RL pre-sampling: split the training prompts into D_pef and D_exp, keep π_0's reference samples.

``k + 1`` completions per prompt from the initial policy π_0 (the normal
``rollout`` and ``score`` stages); a prompt joins D_pef when its first k
samples reach ``threshold`` accuracy and the (k+1)-th is correct too (Li et
al. 2025, arXiv 2509.07430, §3.2; :func:`fdivctl.objectives.dph.split_prompts`).
The directory written is a reusable artifact:

* ``presample.scored.parquet`` — every pre-sample, scored, with π_0's log-probs;
* ``reference.parquet`` — the correct pre-samples of D_pef prompts (the stored
  reference samples: token ids and π_0 log-probs at the sampling temperature);
* ``pef_prompts.parquet`` / ``exp_prompts.parquet`` — the two prompt sets;
* ``partition.json`` — k, threshold, sizes, temperature, model and tokenizer
  hashes; written last, so its presence marks a finished partition.

Interrupted runs resume: the rollout resumes its parts, a finished file is not redone.

Under torchrun each rank pre-samples its share of the prompts (every N-th,
as ``rollout --shard``) into ``presample-shard-i-of-N.parquet``; rank 0 then
joins the shards, scores and splits, and writes every file above.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from fdivctl.errors import UserError
from fdivctl.io.atomic import write_json
from fdivctl.io.hashing import model_hash
from fdivctl.io.tables import provenance, read_table, write_table
from fdivctl.objectives.dph import split_prompts
from fdivctl.rewards.verifiers import Reward
from fdivctl.stages.rollout import RolloutOptions, merge_rollouts, run_rollout, shard_path
from fdivctl.stages.score import check_prompt_columns, score_table
from fdivctl.stages.train_rl import PARTITION_FILE
from fdivctl.training import distributed


def run_partition(policy: Path, prompts: Path, out: Path, verifier: Reward, k: int, threshold: float,
                  rollout: RolloutOptions, workers: int = 2, timeout: float = 10.0, on_batch=None,
                  dist_backend: str = "auto") -> dict:
    """Pre-sample, score and split; returns the partition record (on every rank under torchrun)."""
    if k < 1 or not 0 < threshold <= 1:
        raise UserError("--k must be ≥ 1 and --pef-threshold lie in (0, 1]")
    if rollout.sampling.temperature == 0:
        raise UserError("pre-sampling needs --temperature > 0 (k greedy samples would be identical)")
    check_prompt_columns(prompts, verifier)
    out = Path(out)
    if (out / PARTITION_FILE).exists():
        raise UserError(f"{out} already holds a finished partition")
    world = distributed.init_world(dist_backend, rollout.device)
    out.mkdir(parents=True, exist_ok=True)
    rollout.sampling.n = k + 1
    rollout.resume = True
    samples, scored = out / "presample.parquet", out / "presample.scored.parquet"
    if not scored.exists():
        _presample(policy, prompts, samples, rollout, world, on_batch)
        if world.main:
            score_table(samples, scored, verifier, workers=workers, timeout=timeout)
            samples.unlink()
    summary = _split(policy, prompts, out, scored, k, threshold, rollout.sampling.temperature) if world.main else None
    return distributed.broadcast_object(summary, world)


def _presample(policy: Path, prompts: Path, samples: Path, rollout: RolloutOptions, world: distributed.World,
               on_batch) -> None:
    """``samples``: k + 1 completions of every prompt, each rank sampling its shard; rank 0 joins the shards."""
    if samples.exists():
        return
    if not world.distributed:
        run_rollout(policy, prompts, samples, rollout, on_batch)
        return
    shards = [shard_path(samples, i, world.size) for i in range(world.size)]
    if not shards[world.rank].exists():
        run_rollout(policy, prompts, shards[world.rank], replace(rollout, shard=(world.rank, world.size)), on_batch)
    distributed.barrier(world)
    if world.main:
        merge_rollouts(shards, samples)
        for shard in shards:
            shard.unlink()


def _split(policy: Path, prompts: Path, out: Path, scored: Path, k: int, threshold: float,
           temperature: float) -> dict:
    """Split the scored pre-samples into D_pef / D_exp and write the partition's files (``partition.json`` last)."""
    table = read_table(scored)
    verdicts: dict[str, list[bool]] = defaultdict(list)
    order = sorted(range(table.num_rows), key=lambda i: table.column("sample_idx")[i].as_py())
    ids, correct = table.column("prompt_id").to_pylist(), table.column("correct").to_pylist()
    for i in order:
        verdicts[str(ids[i])].append(bool(correct[i]))
    pef, exp = split_prompts(dict(verdicts), k, threshold)
    record = {**provenance(scored), "stage": "dph-partition"}
    pef_set = pc.is_in(table.column("prompt_id"), value_set=pa.array(pef, table.column("prompt_id").type))
    reference = table.filter(pc.and_(pef_set, table.column("correct")))
    write_table(out / "reference.parquet", reference, record)
    prompt_table = read_table(prompts)
    as_text = pc.cast(prompt_table.column("prompt_id"), "string")
    pef_prompts = pc.is_in(as_text, value_set=pa.array(pef, "string"))
    write_table(out / "pef_prompts.parquet", prompt_table.filter(pef_prompts), record)
    write_table(out / "exp_prompts.parquet", prompt_table.filter(pc.invert(pef_prompts)), record)
    summary = {
        "k": k,
        "pef_threshold": threshold,
        "pef_prompts": len(pef),
        "exp_prompts": len(exp),
        "reference_samples": reference.num_rows,
        "pef_prompt_ids": sorted(pef),
        "temperature": temperature,
        "model_hash": model_hash(policy),
        "tokenizer_hash": record["tokenizer_hash"],
    }
    write_json(out / PARTITION_FILE, summary)
    return summary
