"""``distill``: pull a student toward a teacher, offline on fixed sequences or on-policy on its own samples.

Teacher signal: ``logits`` (a store from ``teacher-logits``: top-k + tail,
read memory-mapped and checked token by token against the batch) or
``teacher`` (a model run under no_grad; its logits are made chunk by chunk
inside the engine; several teachers mix per token).  The student's final
hidden states at the positions that predict the scored tokens go through
:func:`fdivctl.objectives.kd.kd_loss` (any registry divergence, PLD, SinKD,
BD-KD, ce) or, on-policy with ``loss="opd"``, through
:func:`fdivctl.objectives.opd.opd_loss` (the sampled-token policy gradient,
with vOPD's baseline).

On-policy (``opts.on_policy``): each micro-batch's prompts are sampled
``samples_per_prompt`` times by the student with its current weights, at the
distillation temperature (no top-k/top-p: the samples follow q), seeded by
(run seed, step, batch) so that a resumed run draws the same samples.
Registry divergences and the other losses then compare the full distributions
at the sampled states (GKD-style); ``opd`` uses the sampled tokens' rewards.
With a sequences table and ``on_policy_fraction`` λ < 1 (GKD's mixture, Agarwal
et al. 2024, Algorithm 1; TRL's ``lmbda``), a micro-batch is the student's
samples for its rows' prompt tokens with probability λ (drawn from the run
seed, step and micro-batch), else the rows' own completions.

Per-token weights: PACED (``prompt_weighting="paced"``, from each row's pass
rate) and TCOD (``depth_curriculum``, turns from a ``turn_ids`` column or the chat
template's assistant headers) multiply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from fdivctl import divergences, engine
from fdivctl.engine.targets import normalize_weights
from fdivctl.engine.topk import head_topk
from fdivctl.errors import UserError
from fdivctl.generation.sampling import SamplingOptions, encode_prompts
from fdivctl.io.checkpoints import ModelLimits, load_causal_lm, load_tokenizer, model_limits
from fdivctl.io.hashing import tokenizer_hash
from fdivctl.io.lm_head import LMHead
from fdivctl.io.logit_store import LogitStore
from fdivctl.io.sequences import Sequences, check_max_length, int_list_column, load_sequences, read_sequences
from fdivctl.io.tables import read_table, require_columns, require_no_nulls, require_prompt_ids
from fdivctl.objectives.kd import KDBatch, kd_loss, parse_loss
from fdivctl.objectives.opd import BASELINES, opd_loss
from fdivctl.objectives.pld import PlackettLuce
from fdivctl.objectives.trust_region import trust_region_mask
from fdivctl.schedules.depth import (
    assistant_header,
    exposed_turns,
    turns_from_chat_template,
)
from fdivctl.schedules.divergence_schedule import DivergenceSchedule
from fdivctl.schedules.paced import paced_weights
from fdivctl.stages.live_sampler import live_generator
from fdivctl.stages.signals import (
    FrozenModel,
    check_same_tokenizer,
    store_target,
    store_token_logprobs,
)
from fdivctl.training import distributed
from fdivctl.training.checkpoint import has_state
from fdivctl.training.loop import LoopOptions, TokenMean, run_loop
from fdivctl.training.lora import weights_to_load
from fdivctl.training.run_settings import begin_run, run_settings

PROMPT_WEIGHTINGS = ("none", "paced")
#: each step's loss is the mean over all its tokens; the response length and on-policy share are per micro-batch
TOKEN_MEAN = TokenMean(per_micro_batch=("response_length", "on_policy_share"))


@dataclass
class OnPolicyOptions:
    samples_per_prompt: int = 4
    max_new_tokens: int = 128
    baseline: str = "none"  # opd only: none | vopd
    baseline_topk: int | None = None  # vOPD's KL over the teacher's top-k + tail instead of the vocabulary
    backend: str = "hf"
    chat: bool = False

    def check(self, loss: str) -> None:
        if self.samples_per_prompt < 1 or self.max_new_tokens < 1:
            raise UserError("--samples-per-prompt and --max-new-tokens must be ≥ 1")
        if self.baseline not in BASELINES:
            raise UserError(f"--baseline {self.baseline!r}; valid: {', '.join(BASELINES)}")
        if self.baseline != "none" and loss != "opd":
            raise UserError(f"--baseline {self.baseline} is a baseline of --loss opd (the sampled-token reward)")
        if self.baseline_topk is not None and (self.baseline != "vopd" or self.baseline_topk < 1):
            raise UserError("--baseline-topk K (K ≥ 1) sets vOPD's KL support: use it with --baseline vopd")


@dataclass
class DistillOptions:
    loss: str | None = None  # a registry spec ("jsd:beta=0.3"), pld, sinkhorn, bdkd, ce, opd; None: fkl / opd
    schedule: str | None = None  # "fkl:0.5,rkl:0.5": replaces loss
    temperature: float = 1.0
    mix_ce: float = 0.0
    chunk_size: int | None = None  # token rows per chunk of the student head's [rows, V] pass; None: the default
    tail: str = "tail"
    vocab: str = "strict"
    dtype: str = "auto"
    device: str = "auto"
    allow_tokenizer_mismatch: bool = False
    allow_prompt_mismatch: bool = False  # a store whose teacher saw other prompts (context distillation)
    teacher_weights: str | None = None  # several teachers: "0.7,0.3" or "confidence" (default)
    on_policy: OnPolicyOptions | None = None  # None: offline, on the data's sequences
    on_policy_fraction: float | None = None  # GKD's λ: on-policy over a sequences table, this share sampled
    chat: bool = False  # text prompt/completion tables (data, eval data): prompts through the chat template
    max_length: int | None = None  # data and eval data: sequences cut to this many tokens (Sequences.truncate)
    prompt_weighting: str = "none"  # none | paced
    paced_alpha: float = 1.0
    paced_beta: float = 1.0
    pass_rates: Path | None = None  # a scored table: prompt_id → pass_rate (else the data's pass_rate column)
    depth_curriculum: bool = False
    depth_start: int = 1
    depth_warmup: int = 100
    eval_data: Path | None = None  # held-out sequences, evaluated every loop.eval_every steps
    eval_logits: Path | None = None  # the store of eval_data, when the teacher signal is a store
    trust_region: float | None = None  # ERPD: distill tokens where |log p_T − log q_base| ≤ ε
    loop: LoopOptions = field(default_factory=LoopOptions)

    @property
    def loss_name(self) -> str:
        """The fixed loss's name, or "schedule" when --schedule replaces it."""
        if self.schedule:
            return "schedule"
        return self.loss or ("opd" if self.on_policy else "fkl")

    def divergences(self) -> DivergenceSchedule | None:
        """The loss of each step (a one-stage schedule for a fixed --loss); None for ce and opd."""
        try:
            if self.schedule:
                return DivergenceSchedule.parse(self.schedule, parse_loss)
            if self.loss_name in ("ce", "opd"):
                return None
            return DivergenceSchedule([(parse_loss(self.loss_name), 1.0)])
        except ValueError as err:
            raise UserError(f"--{'schedule' if self.schedule else 'loss'}: {err}") from None

    def check(self) -> None:
        if not self.temperature > 0:
            raise UserError(f"--temperature must be > 0, got {self.temperature}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise UserError(f"--chunk-size must be ≥ 1, got {self.chunk_size}")
        check_max_length(self.max_length)
        if self.prompt_weighting not in PROMPT_WEIGHTINGS:
            raise UserError(f"--prompt-weighting {self.prompt_weighting!r}; valid: {', '.join(PROMPT_WEIGHTINGS)}")
        if self.on_policy_fraction is not None:
            if self.on_policy is None or not 0 < self.on_policy_fraction <= 1:
                raise UserError("--on-policy-fraction λ (0 < λ ≤ 1) is GKD's share of sampled micro-batches: give it "
                                "with --on-policy and --data")
            if self.loss_name in ("opd", "ce"):
                raise UserError(f"--on-policy-fraction mixes the data's completions with samples under one "
                                f"divergence: --loss jsd, fkl, … (not {self.loss_name})")
        if self.on_policy is not None:
            self.on_policy.check(self.loss_name)
            if self.loss_name == "ce":
                raise UserError("--loss ce has no teacher: on-policy distillation needs one")
            if self.depth_curriculum:
                raise UserError("--depth-curriculum reads turn_ids of fixed multi-turn data: it is offline only")
            if self.max_length is not None:
                raise UserError("--max-length cuts fixed sequences: on-policy, --max-new-tokens bounds the samples")
            if self.loop.group_by_length:
                raise UserError("--group-by-length groups fixed sequences: on-policy samples have no length before "
                                "they are drawn")
        elif self.loss_name == "opd":
            raise UserError("--loss opd scores the student's own samples: add --on-policy --prompts FILE")
        if self.trust_region is not None and not self.trust_region > 0:
            raise UserError(f"--trust-region ε must be > 0, got {self.trust_region}")
        if self.trust_region is not None and self.loss_name in ("opd", "ce"):
            raise UserError("--trust-region ε bounds a distillation divergence (--loss fkl, jsd, …), not "
                            f"--loss {self.loss_name}")
        if self.mix_ce < 0:
            raise UserError(f"--mix-ce is a weight of the cross-entropy: it must be ≥ 0, got {self.mix_ce}")


def _teacher_weights(spec: str | None, n_teachers: int) -> list[float] | str:
    if spec is not None and n_teachers < 2:
        raise UserError("--teacher-weights needs several --teacher")
    if spec is None or spec == "confidence":
        return "confidence"
    try:
        weights = [float(w) for w in spec.split(",")]
    except ValueError:
        raise UserError(f"--teacher-weights {spec!r}: expected numbers like 0.7,0.3 or 'confidence'") from None
    try:
        return normalize_weights(weights, n_teachers)
    except ValueError:
        raise UserError(f"--teacher-weights {spec!r}: need {n_teachers} finite non-negative weights with a "
                        "positive sum") from None


def _row_weights(table: pa.Table, path: Path, prompt_ids: list[str], opts: DistillOptions) -> torch.Tensor | None:
    """PACED's weight of each row, from ``--pass-rates`` or the table's ``pass_rate`` column; None without PACED."""
    if opts.prompt_weighting == "none":
        return None
    if opts.pass_rates is not None:
        scored = read_table(opts.pass_rates)
        require_columns(scored, opts.pass_rates, ["prompt_id", "pass_rate"])
        rates = dict(zip((str(p) for p in scored.column("prompt_id").to_pylist()),
                         scored.column("pass_rate").to_pylist()))
        missing = [pid for pid in prompt_ids if rates.get(pid) is None]
        if missing:
            raise UserError(f"--pass-rates {opts.pass_rates}: no pass rate for prompt_id {missing[0]!r}")
        values = [rates[pid] for pid in prompt_ids]
    else:
        require_columns(table, path, ["pass_rate"], " (PACED weights prompts by the student's pass rate: run "
                        "rollout + score of the student, or give --pass-rates SCORED.parquet)")
        require_no_nulls(path, "pass_rate", table.column("pass_rate"))
        values = table.column("pass_rate").to_pylist()
    try:
        return paced_weights(torch.tensor(values, dtype=torch.float64), opts.paced_alpha, opts.paced_beta)
    except ValueError as err:
        raise UserError(f"--prompt-weighting paced: {err}") from None


def _turn_ids(table: pa.Table, path: Path, seqs: Sequences, tokenizer) -> list[np.ndarray]:
    """Each row's 0-based turn of every completion token: its ``turn_ids``, else found by the chat template."""
    if "turn_ids" not in table.column_names:
        try:
            return turns_from_chat_template(seqs.completion_tokens, assistant_header(tokenizer))
        except ValueError as err:
            raise UserError(f"--depth-curriculum: {path} has no turn_ids column and {err}") from None
    turns = int_list_column(table, "turn_ids", path)
    for row, (t, tokens) in enumerate(zip(turns, seqs.completion_tokens)):
        if len(t) != len(tokens) or (len(t) and t.min() < 0):
            raise UserError(f"{path}: row {row}: turn_ids must give a turn index ≥ 0 for each of its "
                            f"{len(tokens)} completion tokens, got {len(t)}")
    return turns


class _Teachers:
    """The online teacher signal of a batch: one teacher, or a per-token mixture."""

    def __init__(self, frozen: list[FrozenModel], weights, vocab: str):
        self.frozen, self.weights, self.vocab = frozen, weights, vocab

    def target(self, batch: dict) -> engine.Target:
        heads = [t.target(t.hidden(batch), self.vocab) for t in self.frozen]
        return heads[0] if len(heads) == 1 else engine.TeacherMixture(heads, self.weights)


def _evaluator(opts: DistillOptions, tokenizer, student_hash: str, limits: ModelLimits, model, batch_loss,
               offline_store: bool):
    """``evaluate(step, total) → {"eval_loss", "eval_tokens"}`` on ``opts.eval_data``, or None without it.

    The held-out loss is the run's loss at that step, unweighted (for ``opd``: the
    sampled-token surrogate is not a loss to report, so ``rkl`` against the teacher).
    """
    if opts.eval_data is None:
        if opts.loop.eval_every:
            raise UserError("--eval-every needs --eval-data FILE (held-out sequences)")
        return None
    seqs = load_sequences(opts.eval_data, tokenizer, opts.chat, opts.max_length)
    seqs.check_scorable(opts.eval_data)
    seqs.check_fits(opts.eval_data, limits)
    store = None
    if offline_store and opts.eval_logits is None and opts.loss_name != "ce":
        raise UserError("--eval-data with --logits needs the held-out sequences' store: --eval-logits DIR")
    if opts.eval_logits is not None:
        store = LogitStore(opts.eval_logits)
        store.check_tokenizer(student_hash, "student", opts.allow_tokenizer_mismatch)
        store.check_chat(opts.chat)
        store.check_max_length(opts.max_length)
        store.check_rows(seqs, opts.eval_data, opts.allow_prompt_mismatch)
    size = opts.loop.batch_size

    def evaluate(step: int, total: int) -> dict:
        was_training = model.training
        model.eval()
        loss_sum, tokens = 0.0, 0.0
        try:
            with torch.no_grad():
                for start in range(0, len(seqs), size):
                    rows = list(range(start, min(start + size, len(seqs))))
                    loss, figures = batch_loss(seqs, rows, None, step, total, store, evaluating=True)
                    loss_sum += float(loss) * figures.get("tokens", 0.0)
                    tokens += figures.get("tokens", 0.0)
        finally:
            model.train(was_training)
        return {"eval_loss": loss_sum / max(tokens, 1.0), "eval_tokens": tokens}

    return evaluate


def prepare_distill(
    student: Path,
    data: Path,
    opts: DistillOptions,
    logits: Path | None = None,
    teacher: Path | list[Path] | None = None,
    resume_from: Path | None = None,
):
    """(model, tokenizer, number of examples, loss_fn(example indices, step, total) → (loss, figures)).

    ``data`` is a sequences table offline, a prompts table on-policy; examples are its rows.
    """
    opts.check()
    schedule = opts.divergences()
    teachers = [] if teacher is None else [teacher] if isinstance(teacher, (str, Path)) else list(teacher)
    uses_teacher = opts.loss_name != "ce"
    if uses_teacher and (logits is None) == (not teachers):
        raise UserError("give exactly one teacher signal: --logits DIR (offline) or --teacher MODEL (online)")
    if not uses_teacher and (logits is not None or teachers):
        raise UserError("--loss ce uses no teacher: drop --logits/--teacher")
    if opts.on_policy is not None and logits is not None:
        raise UserError("--logits holds fixed sequences: on-policy distillation samples new ones, use --teacher")
    if opts.loss_name == "opd" and len(teachers) > 1:
        raise UserError("--loss opd rewards each sampled token by one teacher's log-prob: give one --teacher "
                        "(several teachers on-policy: --loss jsd, rkl, …)")
    tokenizer = load_tokenizer(student, "student")
    student_hash = tokenizer_hash(tokenizer)
    store = None
    if logits is not None:
        store = LogitStore(logits)
        store.check_tokenizer(student_hash, "student", opts.allow_tokenizer_mismatch)
        store.check_chat(opts.chat)
        store.check_max_length(opts.max_length)
    weights = _teacher_weights(opts.teacher_weights, len(teachers))
    for t in teachers:
        check_same_tokenizer(t, "teacher", student_hash, f"student {student}", opts.allow_tokenizer_mismatch)
    limits = model_limits((student, "student"), *((t, "teacher") for t in teachers))
    mixed = opts.on_policy_fraction is not None
    if opts.on_policy is not None and not mixed:
        table = read_table(data)
        require_columns(table, data, ["prompt_id"], " (on-policy distillation reads a prompts table)")
        require_prompt_ids(data, table.column("prompt_id"))
        prompt_rows = table.to_pylist()
        encoded = [ids for _, ids in encode_prompts(tokenizer, prompt_rows, opts.on_policy.chat, limits.context,
                                                     limits.context_of)]
        prompt_ids = [str(row["prompt_id"]) for row in prompt_rows]
        seqs = None
    else:
        table, seqs = read_sequences(data, tokenizer, opts.chat, opts.max_length)
        seqs.check_scorable(data)  # refuse unscorable rows before any training, not when their batch comes
        seqs.check_tokenizer(data, student_hash, "student", opts.allow_tokenizer_mismatch)
        seqs.check_fits(data, limits)
        if store is not None:
            store.check_rows(seqs, data, opts.allow_prompt_mismatch)
        prompt_ids = seqs.prompt_ids
        if mixed:  # GKD's mixture samples after the rows' own prompts
            encoded = [p.tolist() for p in seqs.prompt_tokens]
    row_weights = _row_weights(table, data, prompt_ids, opts)
    turns = _turn_ids(table, data, seqs, tokenizer) if opts.depth_curriculum else None
    max_turns = max((int(t.max()) + 1 for t in turns if len(t)), default=1) if turns is not None else 1
    frozen = [FrozenModel.load(t, "teacher", opts.dtype, opts.device, opts.chunk_size) for t in teachers]
    if opts.trust_region is not None and len(frozen) > 1:
        raise UserError("--trust-region compares one teacher with the base: give one --teacher (or --logits)")
    base = None if opts.trust_region is None else FrozenModel.load(student, "student", opts.dtype, opts.device,
                                                                   opts.chunk_size)
    signal = _Teachers(frozen, weights, opts.vocab)
    model = load_causal_lm(weights_to_load(student, resume_from, opts.loop.lora), opts.dtype, opts.device,
                           "student").train()
    lm = LMHead.of(model, "student")
    device = lm.weight.device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    current = {"step": 0, "micro_step": None, "micro": 0}  # the optimizer step, and the micro-batch within it
    generate = None
    if opts.on_policy is not None:
        generate = live_generator(model, tokenizer, resume_from or student, opts.on_policy.backend, opts.dtype,
                                  opts.device, lambda: current["step"], distributed.current(), limits.context)

    def token_weights(rows: list[int], batch_index: torch.Tensor, step: int):
        """Per-token weights ``[N]`` of the batch (PACED × TCOD), or None when neither is on."""
        if row_weights is None and turns is None:
            return None
        w = torch.ones(len(batch_index), dtype=torch.float64)
        if row_weights is not None:
            w *= row_weights[[rows[b] for b in batch_index.tolist()]]
        if turns is not None:
            depth = exposed_turns(step, opts.depth_start, opts.depth_warmup, max_turns)
            token_turn = torch.from_numpy(np.concatenate([turns[r] for r in rows]))
            w *= (token_turn < depth).double()
        return w.to(device, torch.float32)

    def sampled(rows: list[int], step: int) -> Sequences:
        """Completions of the prompts ``rows``.  Under torchrun rank r holds rows r, r + N, … of the micro-batch:
        the ranks rebuild the whole micro-batch, rank 0 samples it as one process would (same order, same seed)
        and every rank takes its own rows' completions."""
        sampling = SamplingOptions(n=opts.on_policy.samples_per_prompt, temperature=opts.temperature,
                                   max_new_tokens=opts.on_policy.max_new_tokens)
        world = distributed.current()
        shares = distributed.gather_objects(rows, world)
        whole = [share[k] for k in range(len(rows)) for share in shares]  # equal shares (--batch-size check)
        seed = (opts.loop.seed * 1_000_003 + step * 10_007 + whole[0]) % (2**31)
        results = distributed.broadcast_object(generate([encoded[i] for i in whole], sampling, seed), world)
        results = results[world.rank :: world.size]
        per = opts.on_policy.samples_per_prompt
        return Sequences(
            [prompt_ids[i] for i in rows for _ in range(per)], [s for _ in rows for s in range(per)],
            [np.asarray(encoded[i], dtype=np.int64) for i in rows for _ in range(per)],
            [np.asarray(c.token_ids, dtype=np.int64) for per_prompt in results for c in per_prompt], None)

    def batch_loss(batch_seqs: Sequences, batch_rows: list[int], example_of: list[int] | None, step: int,
                   total: int, batch_store: LogitStore | None = store, evaluating: bool = False):
        surrogate = opts.loss_name == "opd" and not evaluating
        divergence = None if schedule is None else schedule.at(step, total)
        if opts.loss_name == "opd" and evaluating:
            divergence = divergences.get("rkl")
        batch = batch_seqs.batch(batch_rows, pad_id, device=device)
        hidden = lm.hidden(batch)
        if not torch.isfinite(hidden).all():  # diverged weights: the loop stops on the non-finite loss
            return hidden.new_tensor(float("nan")), {}
        weights_t = None if example_of is None else \
            token_weights(example_of, batch["batch_index"], step)
        region = {}
        if base is not None and not evaluating:
            with torch.no_grad():
                tokens = batch["token"]
                teacher_logprob = store_token_logprobs(batch_store, batch_seqs, batch_rows, device) \
                    if batch_store is not None else frozen[0].token_logprobs(frozen[0].hidden(batch), tokens,
                                                                             opts.temperature)
                inside = trust_region_mask(teacher_logprob,
                                           base.token_logprobs(base.hidden(batch), tokens, opts.temperature),
                                           opts.trust_region)
            region = {"trust_region_kept": float(inside.mean())}
            weights_t = inside if weights_t is None else weights_t * inside
        try:
            if surrogate:
                return _opd(frozen[0], batch, hidden, lm, opts)
            target, token_logprob = None, None
            if divergence is not None:
                if batch_store is not None:
                    target = store_target(batch_store, batch_seqs, batch_rows, opts.tail, device)
                    if isinstance(divergence, PlackettLuce):
                        token_logprob = store_token_logprobs(batch_store, batch_seqs, batch_rows, device)
                else:
                    target = signal.target(batch)
            loss, figures = kd_loss(KDBatch(hidden, batch["token"], target, token_logprob, weights_t), lm.weight,
                                    lm.bias, divergence, opts.temperature, opts.mix_ce, opts.chunk_size, lm.softcap)
            return loss, {**figures, **region}
        except ValueError as err:
            raise UserError(str(err)) from None

    def loss_fn(rows: list[int], step: int = 0, total: int = 1):
        """The mean loss over the tokens of ``rows`` (under torchrun: this rank's share of them); the loop weighs
        the step's micro-batches and ranks by their tokens (:data:`TOKEN_MEAN`)."""
        current["micro"] = current["micro"] + 1 if current["micro_step"] == step else 0
        current["step"] = current["micro_step"] = step
        if generate is None or (mixed and not _draws_samples(opts, step, current["micro"])):
            loss, figures = batch_loss(seqs, rows, rows, step, total)
            if not mixed:
                return loss, figures
            # a mixed step's response_length averages its micro-batches' completions, the data's and the samples'
            return loss, {**figures, "response_length": figures["tokens"] / len(rows), "on_policy_share": 0.0}
        batch_seqs = sampled(rows, step)
        example_of = [r for r in rows for _ in range(opts.on_policy.samples_per_prompt)]
        loss, figures = batch_loss(batch_seqs, list(range(len(batch_seqs))), example_of, step, total)
        figures["response_length"] = figures["tokens"] / len(batch_seqs)  # every rank samples as many
        return loss, {**figures, "on_policy_share": 1.0} if mixed else figures

    loss_fn.evaluate = _evaluator(opts, tokenizer, student_hash, limits, model, batch_loss, store is not None)
    loss_fn.cut_rows = {} if seqs is None else seqs.cut_counts()
    loss_fn.lengths = None if seqs is None else seqs.lengths()
    return model, tokenizer, len(table), loss_fn


def _draws_samples(opts: DistillOptions, step: int, micro: int) -> bool:
    """GKD's draw for micro-batch ``micro`` of step ``step``: sampled with probability ``on_policy_fraction``.
    From the run seed, step and micro-batch alone, so every rank draws alike and a resumed run draws as an
    uninterrupted one."""
    generator = torch.Generator().manual_seed((opts.loop.seed * 1_000_003 + step * 10_007 + micro) % (2**31))
    return float(torch.rand((), generator=generator)) < opts.on_policy_fraction


def _opd(teacher: FrozenModel, batch: dict, hidden: torch.Tensor, student: LMHead, opts: DistillOptions):
    """OPD's surrogate on a batch of the student's samples, with vOPD's baseline when asked."""
    teacher_hidden = teacher.hidden(batch)
    tokens = batch["token"]
    baseline_target = None
    if opts.on_policy.baseline == "vopd" and opts.on_policy.baseline_topk is None:
        baseline_target = teacher.target(teacher_hidden, opts.vocab)
    if opts.on_policy.baseline_topk is not None:
        top = head_topk(teacher_hidden, teacher.weight, opts.on_policy.baseline_topk, tokens,
                        bias=teacher.bias, temperature=opts.temperature, softcap=teacher.softcap)
        baseline_target = engine.TopK(top.ids, top.logprobs, top.log_tail, temperature=opts.temperature)
        teacher_logprob = top.token_logprob
    else:
        teacher_logprob = teacher.token_logprobs(teacher_hidden, tokens, opts.temperature)
    loss, figures = opd_loss(hidden, student.weight, student.bias, tokens, teacher_logprob, baseline_target,
                             opts.temperature, opts.chunk_size, student.softcap)
    figures["response_length"] = float(len(tokens)) / int(batch["input_ids"].shape[0])
    return loss, figures


def run_distill(
    student: Path,
    out: Path,
    data: Path,
    opts: DistillOptions,
    logits: Path | None = None,
    teacher: Path | list[Path] | None = None,
    on_step: Callable[[int, int, dict], None] | None = None,
) -> dict:
    """Distill into ``out``; with ``opts.loop.resume`` continue the checkpoint there.

    Under torchrun the ranks share the work (:mod:`fdivctl.training.distributed`); on-policy, rank 0 samples.
    """
    distributed.init_world(opts.loop.dist_backend, opts.device)
    teachers = [] if teacher is None else [teacher] if isinstance(teacher, (str, Path)) else list(teacher)
    begin_run(out, opts.loop, run_settings(opts, loss=opts.loss_name, student=Path(student),
                                           data=Path(data), logits=logits and Path(logits),
                                           teacher=[Path(t) for t in teachers]))
    resume_from = out if opts.loop.resume and has_state(out) else None
    model, tokenizer, n, loss_fn = prepare_distill(student, data, opts, logits, teacher, resume_from)
    summary = run_loop(model, tokenizer, n, loss_fn, out, opts.loop, on_step, loss_fn.evaluate, loss_fn.lengths,
                       TOKEN_MEAN)
    return summary if opts.max_length is None else {**summary, **loss_fn.cut_rows}
