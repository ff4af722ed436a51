"""``train`` for the GRPO family and DPH-RL: staged (on a scored rollouts file) or online (sample → score → update).

Staged: the rollouts' own ``completion_logprobs`` are the old policy; the
optimizer steps of :class:`~fdivctl.stages.policy_update.PolicyUpdate` run
one after another (resumable step by step); the learning-rate schedule spans
those steps.

Online: each iteration takes ``prompts_per_iteration`` distinct prompts (a
shuffle seeded by ``seed + iteration``), samples ``group_size`` completions
per prompt with the live model (seed ``seed + iteration``; ``hf`` generates
with the training model itself, ``vllm`` keeps one engine and loads the
updated weights into it before each iteration's sampling),
writes ``fdivctl_run/iter-NNNN.scored.parquet`` through the normal ``score``
stage, and updates on it exactly as the staged mode would.  The
learning-rate schedule spans the iterations.  A checkpoint (with the
iteration number) is written every ``save_every`` iterations; ``resume``
continues from it and reuses an iteration's scored file when it exists.

Under torchrun both modes shard the policy with FSDP2 and split each
optimizer step's responses over the ranks; online, rank 0 alone samples and
scores, from a sampler (vLLM, or an unsharded transformers copy) that gets
the full state dict gathered from the shards whenever the weights changed
(:mod:`fdivctl.stages.live_sampler`), and the other ranks wait for its file.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from fdivctl.errors import UserError
from fdivctl.generation.sampling import SamplingOptions, encode_prompts
from fdivctl.io.checkpoints import ModelLimits, load_causal_lm, load_tokenizer, model_limits
from fdivctl.io.hashing import tokenizer_hash
from fdivctl.io.logit_store import LogitStore
from fdivctl.io.prompts import encode_prompt
from fdivctl.io.sequences import (
    Sequences,
    has_token_ids,
    int_list_column,
    load_sequences,
    sampled_logprobs,
    sequences_from_table,
)
from fdivctl.io.tables import (
    open_parquet,
    provenance,
    read_table,
    require_columns,
    require_prompt_ids,
    write_table,
)
from fdivctl.objectives import trace
from fdivctl.rewards.pool import failures
from fdivctl.rewards.verifiers import Reward
from fdivctl.schedules import curriculum
from fdivctl.schedules.replay_weights import RecapWeights
from fdivctl.stages.live_sampler import live_generator
from fdivctl.stages.policy_update import PolicyUpdate
from fdivctl.stages.rl_data import Credit, ReferencePolicy, ReferenceSamples, Replay, ScoredRollouts
from fdivctl.stages.rl_options import RLOptions
from fdivctl.stages.rollout import rollout_rows
from fdivctl.stages.score import check_prompt_columns, score_table
from fdivctl.stages.signals import FrozenModel, check_same_tokenizer
from fdivctl.training import distributed
from fdivctl.training.checkpoint import has_state, run_dir
from fdivctl.training.loop import Interruption, MetricsLog, Trainer, check_fresh_output
from fdivctl.training.lora import weights_to_load
from fdivctl.training.run_settings import begin_run, run_settings

PARTITION_FILE = "partition.json"
PROMPT_SAMPLING = ("uniform", "gaussian")


@dataclass
class OnlineOptions:
    iterations: int = 10
    prompts_per_iteration: int = 8
    group_size: int = 8
    sampling: SamplingOptions | None = None  # n is group_size; seed is the run's seed
    chat: bool = False
    score_workers: int = 2
    score_timeout: float = 10.0
    save_every: int = 1  # iterations
    backend: str = "hf"  # hf | vllm | auto (vllm on CUDA when installed)
    prompt_sampling: str = "uniform"  # uniform | gaussian (FG-ExPO's GCS, schedules/curriculum.py)
    gcs_mu: float = 0.5
    gcs_sigma: float = 0.2

    def check(self) -> None:
        if self.iterations < 1 or self.prompts_per_iteration < 1 or self.save_every < 1:
            raise UserError("--iterations, --prompts-per-iteration and --save-every must be ≥ 1")
        if self.prompt_sampling not in PROMPT_SAMPLING:
            raise UserError(f"--prompt-sampling {self.prompt_sampling!r}; valid: {', '.join(PROMPT_SAMPLING)}")
        if not self.gcs_sigma > 0:
            raise UserError("--gcs-sigma must be > 0")
        if self.group_size < 2:
            raise UserError("--group-size must be ≥ 2: GRPO compares samples of one prompt")
        if self.score_workers < 1:
            raise UserError(f"--score-workers must be ≥ 1, got {self.score_workers}")
        self.group_sampling().check()

    def group_sampling(self) -> SamplingOptions:
        """The sampling options of an iteration: ``group_size`` samples of each prompt, at a temperature > 0."""
        sampling = SamplingOptions(**{**(self.sampling or SamplingOptions()).as_record(), "n": self.group_size})
        if sampling.temperature == 0:
            raise UserError("online RL samples its groups: --temperature must be > 0")
        return sampling


def _load_policy(policy: Path, out: Path, opts: RLOptions):
    resume_from = out if opts.loop.resume and has_state(out) else None
    tokenizer = load_tokenizer(policy, "policy")
    model = load_causal_lm(weights_to_load(policy, resume_from, opts.loop.lora), opts.dtype, opts.device,
                           "policy").train()
    return model, tokenizer


def _frozen(model: Path | None, store: Path | None, role: str, flags: tuple[str, str], policy_hash: str,
            opts: RLOptions, online: bool) -> ReferencePolicy:
    """A frozen policy the update reads log-probs or targets from: a model, or (staged only) a logit store;
    ``flags`` name the options (model, store) in messages."""
    if store is not None:
        if online:
            raise UserError(f"{flags[1]} holds fixed sequences: online training samples new ones, use {flags[0]}")
        logits = LogitStore(store)
        logits.check_tokenizer(policy_hash, "policy", opts.allow_tokenizer_mismatch)
        return ReferencePolicy(None, logits, opts.tail)
    return ReferencePolicy(FrozenModel.load(model, role, opts.dtype, opts.device, opts.chunk_size), None, opts.tail)


def _reference(policy: Path, policy_hash: str, opts: RLOptions, online: bool) -> ReferencePolicy | None:
    """The reference (of the regularizer, DGPO's guidance or f-DPG's target): ``--ref-logits`` (staged only),
    ``--ref-model``, else the initial policy."""
    if not opts.needs_reference:
        return None
    if opts.ref_model is not None:
        check_same_tokenizer(opts.ref_model, "reference model", policy_hash, f"policy {policy}",
                             opts.allow_tokenizer_mismatch)
    return _frozen(opts.ref_model or policy, opts.ref_logits, "reference model", ("--ref-model", "--ref-logits"),
                   policy_hash, opts, online)


def _teacher(policy: Path, policy_hash: str, opts: RLOptions, online: bool) -> ReferencePolicy | None:
    """KDRL's teacher: ``--teacher MODEL`` or (staged only) ``--teacher-logits STORE``; None without one."""
    if not opts.has_teacher:
        return None
    if opts.teacher is not None:
        check_same_tokenizer(opts.teacher, "teacher", policy_hash, f"policy {policy}", opts.allow_tokenizer_mismatch)
    return _frozen(opts.teacher, opts.teacher_logits, "teacher", ("--teacher", "--teacher-logits"), policy_hash,
                   opts, online)


def load_partition(directory: Path, policy_hash: str, allow_mismatch: bool) -> tuple[dict, ReferenceSamples]:
    """DPH-RL's partition record and its reference samples."""
    record_path = Path(directory) / PARTITION_FILE
    if not record_path.is_file():
        raise UserError(f"{directory}: not a DPH partition (no {PARTITION_FILE}); make one with "
                        "`fdivctl train MODEL DIR --algo dph --partition --prompts …`")
    record = json.loads(record_path.read_text())
    if record["tokenizer_hash"] != policy_hash and not allow_mismatch:
        raise UserError(f"tokenizer mismatch: partition {directory} was sampled with {record['tokenizer_hash'][:16]}…"
                        f", the policy has {policy_hash[:16]}…")
    path = Path(directory) / "reference.parquet"
    table = pq.read_table(path)  # may be empty: no prompt reached D_pef
    seqs = sequences_from_table(table, path)
    samples = ReferenceSamples(seqs, sampled_logprobs(table, path, seqs), float(record["temperature"]))
    return record, samples


def _replay(tokenizer, policy_hash: str, limits: ModelLimits, opts: RLOptions, chat: bool) -> Replay | None:
    """RECAP's replayed tables (``--replay``), tokenized (text prompts through the chat template with ``chat``,
    as the online run's prompts) and checked before any training."""
    if not opts.replay:
        return None
    sets = []
    for path in opts.replay:
        names = open_parquet(path).schema_arrow.names  # token ids were encoded when sampled, plain text has no prompt
        seqs = load_sequences(path, tokenizer, chat and "prompt" in names and not has_token_ids(names))  # an empty table is refused as it is read
        seqs.check_scorable(path)
        seqs.check_tokenizer(path, policy_hash, "policy", opts.allow_tokenizer_mismatch)
        seqs.check_fits(path, limits)
        sets.append(seqs)
    weights = RecapWeights(1 + len(sets), opts.recap_window, opts.recap_temperature) \
        if opts.replay_weighting == "recap" else None
    return Replay(sets, opts.replay_divergence(), opts.replay_coef, opts.replay_batch_size, weights)


def _prepare(policy: Path, out: Path, opts: RLOptions, online: bool, chat: bool = False):
    """Under torchrun the ranks split each step's responses (policy_update.py); online, rank 0 samples.

    Also returns the token bounds of every model the run loads (:func:`model_limits`), which its sequences
    and prompts are checked against."""
    distributed.init_world(opts.loop.dist_backend, opts.device)
    opts.resolve()
    if opts.algo == "trace" and online:
        raise UserError("--algo trace trains on annotated spans of given rollouts: annotate them (a spans column) "
                        "and train staged with --rollouts")
    model, tokenizer = _load_policy(policy, out, opts)
    frozen = [(opts.ref_model if opts.needs_reference else None, "reference model"), (opts.teacher, "teacher")]
    limits = model_limits((policy, "policy"), *((path, role) for path, role in frozen if path is not None))
    policy_hash = tokenizer_hash(tokenizer)
    samples, record = None, None
    if opts.algo == "dph":
        record, samples = load_partition(opts.partition_dir, policy_hash, opts.allow_tokenizer_mismatch)
    update = PolicyUpdate(model, tokenizer, opts, _reference(policy, policy_hash, opts, online), samples,
                          _teacher(policy, policy_hash, opts, online), _replay(tokenizer, policy_hash, limits, opts, chat))
    return model, tokenizer, policy_hash, update, record, limits


def _privileged(table: pa.Table, path: Path, data: ScoredRollouts, tokenizer, chat: bool) -> Sequences | None:
    """TRACE's privileged context: the rollouts' completions after each row's ``privileged_prompt_token_ids``
    (or ``privileged_prompt`` text, encoded as the rollout encoded its prompts); None without either column."""
    names = table.column_names
    if "privileged_prompt_token_ids" in names:
        prompt_tokens = int_list_column(table, "privileged_prompt_token_ids", path)
    elif "privileged_prompt" in names:
        texts = table.column("privileged_prompt").to_pylist()
        if any(not isinstance(t, str) for t in texts):
            raise UserError(f"{path}: column 'privileged_prompt' must be text without nulls")
        prompt_tokens = [np.asarray(encode_prompt(tokenizer, {"prompt": t}, chat)[1], dtype=np.int64) for t in texts]
    else:
        return None
    if any(len(p) == 0 for p in prompt_tokens):
        raise UserError(f"{path}: a privileged prompt is empty")
    seqs = data.seqs
    return Sequences(seqs.prompt_ids, seqs.sample_idx, prompt_tokens, seqs.completion_tokens, seqs.tokenizer_hash)


def _trace_inputs(table: pa.Table, path: Path, data: ScoredRollouts, tokenizer, opts: RLOptions) -> None:
    """Attach TRACE's spans and privileged context to ``data``; refuse a run with no teacher signal."""
    data.spans = trace.read_spans(table, path, data.lengths.tolist())
    data.privileged = _privileged(table, path, data, tokenizer, bool(provenance(path).get("chat")))
    if data.privileged is None and not opts.has_teacher:
        raise UserError(f"{path}: --algo trace needs a teacher: --teacher MODEL, --teacher-logits STORE, or a "
                        "privileged_prompt (or privileged_prompt_token_ids) column for self-distillation under "
                        "privileged context")


def _partition_sizes(record: dict | None) -> dict:
    """DPH-RL's D_pef / D_exp sizes, logged with every step."""
    if record is None:
        return {}
    return {key: record[key] for key in ("pef_prompts", "exp_prompts", "reference_samples")}


def _exp_only(table: pa.Table, record: dict | None) -> pa.Table:
    """For DPH-RL, the rows of D_exp prompts (D_pef prompts are trained through their reference samples)."""
    if record is None:
        return table
    pef = set(record["pef_prompt_ids"])
    keep = [i for i, pid in enumerate(table.column("prompt_id").to_pylist()) if str(pid) not in pef]
    return table.take(keep)


def run_staged(policy: Path, rollouts: Path, out: Path, opts: RLOptions,
               on_step: Callable[[int, int, dict], None] | None = None) -> dict:
    """Optimize on a scored rollouts file; one optimizer step per minibatch per PPO epoch."""
    begin_run(out, opts.loop, run_settings(opts, policy=Path(policy), rollouts=Path(rollouts)))
    model, tokenizer, policy_hash, update, record, limits = _prepare(policy, out, opts, online=False)
    source = provenance(rollouts)
    if source.get("tokenizer_hash") and source["tokenizer_hash"] != policy_hash and not opts.allow_tokenizer_mismatch:
        raise UserError(f"tokenizer mismatch: {rollouts} was sampled with {source['tokenizer_hash'][:16]}…, the "
                        f"policy has {policy_hash[:16]}… (--allow-tokenizer-mismatch skips this check and is unsafe)")
    sampling = source.get("sampling", {})
    temperature = opts.temperature or sampling.get("temperature") or 1.0
    table = _exp_only(read_table(rollouts), record)
    data = ScoredRollouts.from_table(table, rollouts)
    data.seqs.check_fits(rollouts, limits)
    if opts.algo == "trace":
        _trace_inputs(table, rollouts, data, tokenizer, opts)
        if data.privileged is not None:
            data.privileged.check_fits(rollouts, limits)
    # a teacher store holds TRACE's teacher after the privileged prompts, when the rollouts have them
    for frozen, seqs in ((update.reference, data.seqs), (update.teacher, data.privileged or data.seqs)):
        if frozen is not None and frozen.store is not None:
            frozen.store.check_rows(seqs, rollouts, opts.allow_prompt_mismatch)
    credit, kept, figures = update.advantages(data, temperature, sampling.get("max_new_tokens"))
    figures.update(_partition_sizes(record))
    plan = update.steps(data, kept, opts.loop.seed)
    trainer = Trainer(model, tokenizer, out, opts.loop, total=len(plan))
    if "credit" in trainer.state:  # the rewards were shaped (and DGPO's tokens weighed) by the first run's policy
        credit = Credit(**trainer.state["credit"])
        update.load_state_dict(trainer.state)
    last: dict = {}

    def state() -> dict:
        return {"credit": credit.state(), **update.state_dict()}

    with MetricsLog(opts.loop, trainer.world.main, trainer.step) as log, Interruption(trainer) as interruption:
        while trainer.step < len(plan):
            step_figures = update.step(trainer, data, credit, plan[trainer.step], temperature)
            trainer.advance_schedule()
            last = {"step": trainer.step, **figures, **step_figures}
            log.write(last)
            if opts.loop.save_every and trainer.step % opts.loop.save_every == 0 and trainer.step < len(plan):
                trainer.save(state())
            if on_step:
                on_step(trainer.step, len(plan), last)
            if trainer.step < len(plan):
                interruption.save_if_asked(trainer.step, state())
    trainer.save(state())
    return {"steps": trainer.step, "responses": len(data), "responses_kept": len(kept), **last}


def _prompt_order(n_prompts: int, iteration: int, per_iteration: int, seed: int) -> list[int]:
    """Prompts of ``iteration``: the first ``per_iteration`` of a shuffle seeded by ``seed + iteration``."""
    order = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed + iteration)).tolist()
    return order[: min(per_iteration, n_prompts)]


def _record_accuracy(accuracy: dict[str, float], table: pa.Table) -> None:
    """Set each prompt's accuracy in ``accuracy`` to its share of correct samples in the scored ``table``."""
    correct: dict[str, list[bool]] = {}
    for pid, ok in zip(table.column("prompt_id").to_pylist(), table.column("correct").to_pylist()):
        correct.setdefault(str(pid), []).append(bool(ok))
    accuracy.update({pid: sum(oks) / len(oks) for pid, oks in correct.items()})


def _tracked_accuracy(artifacts: Path, iterations: int) -> dict[str, float]:
    """Each prompt's accuracy as last measured in the run's first ``iterations`` iterations (read back from
    their scored rollouts once, when a run starts or resumes; the loop then updates it per iteration)."""
    accuracy: dict[str, float] = {}
    for iteration in range(1, iterations + 1):
        _record_accuracy(accuracy, read_table(artifacts / f"iter-{iteration:04d}.scored.parquet"))
    return accuracy


def _check_pass_rates(table: pa.Table, path: Path) -> None:
    """The Gaussian curriculum's prior: a ``pass_rate`` column, when present, holds shares in [0, 1] (or nulls)."""
    if "pass_rate" not in table.column_names:
        return
    for row, value in enumerate(table.column("pass_rate").to_pylist()):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not 0 <= value <= 1):
            raise UserError(f"{path}: row {row} has pass_rate {value!r}; the curriculum reads it as a share of "
                            "correct samples in [0, 1] (null: unknown)")


def _pick_prompts(rows: list[dict], iteration: int, online: OnlineOptions, seed: int,
                  accuracy: dict[str, float]) -> list[int]:
    """The prompts of ``iteration``: a seeded uniform shuffle, or Gaussian curriculum sampling over the
    tracked ``accuracy`` (unseen prompts: their ``pass_rate`` column, else μ)."""
    if online.prompt_sampling == "uniform":
        return _prompt_order(len(rows), iteration, online.prompts_per_iteration, seed)
    prior = [row.get("pass_rate") for row in rows]
    estimate = torch.tensor([accuracy.get(str(row["prompt_id"]), online.gcs_mu if p is None else p)
                             for row, p in zip(rows, prior)], dtype=torch.float64)
    weights = curriculum.gaussian_weights(estimate, online.gcs_mu, online.gcs_sigma)
    return curriculum.draw(weights, online.prompts_per_iteration, seed + iteration)


def _pass_histogram(table: pa.Table) -> dict[str, int]:
    """How many prompts had j correct samples, for each j."""
    correct = Counter()
    for pid, ok in zip(table.column("prompt_id").to_pylist(), table.column("correct").to_pylist()):
        correct[pid] += int(bool(ok))
    return {str(j): n for j, n in sorted(Counter(correct.values()).items())}


def run_online(policy: Path, prompts: Path, out: Path, verifier: Reward, opts: RLOptions, online: OnlineOptions,
               on_iteration: Callable[[int, int, dict], None] | None = None) -> dict:
    """Sample, score and update for ``online.iterations`` iterations; checkpoint into ``out``."""
    online.check()
    check_fresh_output(out, opts.loop.resume)
    check_prompt_columns(prompts, verifier)
    begin_run(out, opts.loop, run_settings(opts, policy=Path(policy), prompts=Path(prompts), verifier=verifier,
                                           online=online))
    model, tokenizer, policy_hash, update, record, limits = _prepare(policy, out, opts, online=True,
                                                                     chat=online.chat)
    prompt_table = read_table(prompts)
    require_columns(prompt_table, prompts, ["prompt_id"])
    require_prompt_ids(prompts, prompt_table.column("prompt_id"))  # rows of the file, before D_pef goes
    prompt_table = _exp_only(prompt_table, record)
    if prompt_table.num_rows == 0:
        raise UserError(f"{prompts}: no prompts to train on" + (" (all are in D_pef)" if record else ""))
    if online.prompt_sampling == "gaussian":
        _check_pass_rates(prompt_table, prompts)
    rows = prompt_table.to_pylist()
    encode_prompts(tokenizer, rows, online.chat, limits.context, limits.context_of)
    sampling = online.group_sampling()
    temperature = opts.temperature or sampling.temperature
    trainer = Trainer(model, tokenizer, out, opts.loop, total=online.iterations)
    generate = _generator(model, tokenizer, policy, out, opts, online, trainer, limits.context)
    artifacts = run_dir(out)
    last: dict = {}
    first = trainer.state.get("iteration", 0)
    update.load_state_dict(trainer.state)
    accuracy = _tracked_accuracy(artifacts, first) if online.prompt_sampling == "gaussian" else {}
    world = trainer.world
    with MetricsLog(opts.loop, world.main, trainer.step) as log, \
            Interruption(trainer, "iteration") as interruption:
        for iteration in range(first, online.iterations):
            start = time.perf_counter()
            scored = artifacts / f"iter-{iteration + 1:04d}.scored.parquet"
            # rank 0's answer for every rank: another rank looking itself could already see the file rank 0 writes
            if not distributed.broadcast_object(scored.exists(), world):
                picked = _pick_prompts(rows, iteration, online, opts.loop.seed, accuracy)
                _sample_and_score(generate, tokenizer, prompt_table.take(picked), [rows[i] for i in picked],
                                  sampling, sampling.seed + iteration, scored, verifier, online,
                                  {"iteration": iteration + 1, "tokenizer_hash": policy_hash,
                                   "sampling": sampling.as_record(), "backend": online.backend}, world.main)
                distributed.barrier(world)  # rank 0 has written the iteration's scored rollouts
            table = read_table(scored)
            if online.prompt_sampling == "gaussian":
                _record_accuracy(accuracy, table)
            data = ScoredRollouts.from_table(table, scored)
            credit, kept, figures = update.advantages(data, temperature, sampling.max_new_tokens)
            figures.update(_partition_sizes(record))
            steps = [update.step(trainer, data, credit, rows_, temperature)
                     for rows_ in update.steps(data, kept, opts.loop.seed + iteration)]
            trainer.advance_schedule()
            last = {"iteration": iteration + 1, "step": trainer.step, **figures, **_mean(steps),
                    "reward_mean": float(data.rewards.mean()), "accuracy": float(data.correct.mean()),
                    "response_length": float(data.lengths.float().mean()), "pass_histogram": _pass_histogram(table),
                    "verifier_failures": len(failures(table.column("verdict").to_pylist())),
                    "seconds": time.perf_counter() - start}
            log.write(last)
            if (iteration + 1) % online.save_every == 0 or iteration + 1 == online.iterations:
                trainer.save({"iteration": iteration + 1, **update.state_dict()})
            if on_iteration:
                on_iteration(iteration + 1, online.iterations, last)
            if iteration + 1 < online.iterations:
                interruption.save_if_asked(iteration + 1, {"iteration": iteration + 1, **update.state_dict()})
    if not last:
        trainer.save({"iteration": trainer.state.get("iteration", 0), **update.state_dict()})
    return {"iterations": online.iterations, "steps": trainer.step, **last}


def _mean(steps: list[dict]) -> dict:
    """The steps' figures averaged (tokens summed)."""
    if not steps:
        return {}
    keys = {k for s in steps for k in s}
    return {k: (sum(s.get(k, 0.0) for s in steps) / (1 if k == "tokens" else len(steps))) for k in keys}


def _generator(model, tokenizer, policy: Path, out: Path, opts: RLOptions, online: OnlineOptions, trainer: Trainer,
               context: int | None):
    """``generate(prompt ids, sampling, seed)`` with the current weights of ``model``, each sequence within
    ``context`` tokens (the tightest of the run's models)."""
    start = out if opts.loop.resume and has_state(out) else policy
    return live_generator(model, tokenizer, start, online.backend, opts.dtype, opts.device, lambda: trainer.step,
                          trainer.world, context)


def _sample_and_score(generate, tokenizer, batch: pa.Table, rows: list[dict],
                      sampling: SamplingOptions, seed: int, scored: Path, verifier: Reward,
                      online: OnlineOptions, record: dict, main: bool = True) -> None:
    """Sample the iteration's prompts and write their scored rollouts (under torchrun every rank takes part in
    ``generate``'s weight sync; rank 0, ``main``, samples, scores and writes)."""
    encoded = [encode_prompt(tokenizer, row, online.chat) for row in rows]
    results = generate([ids for _, ids in encoded], sampling, seed)
    if not main:
        return
    rollouts = scored.with_name(scored.name.replace(".scored", ".rollouts"))
    table = rollout_rows(batch, rows, encoded, results)
    write_table(rollouts, table, record)
    score_table(rollouts, scored, verifier, workers=online.score_workers, timeout=online.score_timeout)
    rollouts.unlink()

