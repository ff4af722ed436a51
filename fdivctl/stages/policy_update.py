"""One policy-gradient update of the GRPO family on scored rollouts — shared by staged and online ``train``.

Given scored rollouts (``prompt_token_ids``, ``completion_token_ids``, the
old policy's ``completion_logprobs``, ``reward``) grouped by ``prompt_id``:

1. rewards are shaped (DAPO overlong penalty; the divergence to the
   reference when it is placed in the reward), then turned into group
   advantages (:mod:`fdivctl.objectives.grpo`);
2. with dynamic sampling, groups whose rewards are all equal are dropped;
3. for ``ppo_epochs`` passes, the kept responses are shuffled (seeded) into
   minibatches, one optimizer step each, computed in micro-batches through
   the chunked engine (per-token log-prob, entropy and, for the ``full``
   estimator, the closed-form divergence to the reference);
4. with DPH-RL, each step also adds η · L_pef on a batch of stored reference
   samples (:mod:`fdivctl.objectives.dph`); with ``--replay``, each step also
   adds each replayed general-domain objective on a batch of its rows, weighted
   fixed or by RECAP (:mod:`fdivctl.schedules.replay_weights`).

The same :class:`PolicyUpdate` serves ``train --rollouts`` and each iteration
of ``train --prompts``, so both give the same update for the same rollouts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fdivctl import divergences, engine
from fdivctl.divergences import sample_divergence
from fdivctl.errors import UserError
from fdivctl.io.device_copy import upload, upload_vectors
from fdivctl.io.lm_head import LMHead
from fdivctl.io.sequences import Sequences
from fdivctl.objectives import apo, dgpo, dph, fdpg, grpo, kd, rlad, trace
from fdivctl.schedules.anneal import linear_anneal
from fdivctl.stages.rl_data import Credit, ReferencePolicy, ReferenceSamples, Replay, ScoredRollouts
from fdivctl.stages.rl_options import RLOptions
from fdivctl.training import distributed
from fdivctl.training.loop import LoopOptions, Trainer, batches_for_step


@dataclass
class StepScale:
    """The constants of one optimizer step that every micro-batch of it needs."""

    n_tokens: int  # completion tokens of the step's responses
    n_seqs: int
    kd_coef: float = 0.0  # KDRL (annealed)
    div_coef: float = 0.0  # the regularizer's (scheduled) coefficient
    anneal: float = 1.0  # TRACE's a_t
    key_tokens: int = 1  # TRACE: tokens routed to each KL (≥ 1, the denominators of their logged means)
    error_tokens: int = 1
    task_weight: float = 1.0  # RECAP's weight of the RL objective


class PolicyUpdate:
    """The model being trained, its frozen reference, and the update rule (see the module docstring)."""

    def __init__(self, model, tokenizer, opts: RLOptions, reference: ReferencePolicy | None,
                 reference_samples: ReferenceSamples | None = None, teacher: ReferencePolicy | None = None,
                 replay: Replay | None = None):
        self.model, self.opts = model, opts
        self.lm = LMHead.of(model, "policy")
        # what every pass through the head gives the engine besides its weight
        self.head_options = {"bias": self.lm.bias, "softcap": self.lm.softcap, "chunk_size": opts.chunk_size}
        self.device = self.lm.weight.device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.regularizer = opts.regularizer()
        self.reference = reference
        self.samples = reference_samples
        self.teacher = teacher
        self.replay = replay
        self.coefficient = opts.coefficient()
        self.world = distributed.current()
        if opts.needs_reference and reference is None:
            raise UserError(f"--algo {opts.algo} with --divergence {opts.divergence} needs a reference: --ref-model "
                            "DIR or --ref-logits DIR")

    # -- step 1-2: advantages -------------------------------------------------------------------------------------
    def advantages(self, data: ScoredRollouts, temperature: float, max_length: int | None) -> tuple[Credit,
                                                                                                    list[int], dict]:
        """(the batch's credit, the responses kept, figures)."""
        opts = self.opts
        rewards = data.rewards.clone()
        correct = torch.from_numpy(data.correct)
        figures: dict[str, float] = {}
        if opts.overlong_penalty and max_length:
            buffer = max(1, round(opts.overlong_penalty * max_length))
            rewards += grpo.overlong_penalty(data.lengths, max_length, buffer)
        if self.regularizer is not None and opts.div_in == "reward" and opts.algo != "dph":
            per_response = self._per_response(data, lambda rows, batch, hidden: self._divergence(
                data, rows, batch, hidden, temperature, self._old_logprobs(data, rows)))
            figures["divergence"] = float(per_response.sum() / data.lengths.sum())
            rewards -= self.div_coef(data) * per_response
        if opts.algo == "fdpg":
            advantages = self._fdpg_advantages(data, rewards, correct, temperature, figures)
        else:
            advantages = grpo.group_advantages(rewards, data.groups, opts.std_norm)
        if opts.stcr:
            scale = apo.stcr_scale(data.lengths, correct, data.groups)
            figures["stcr_penalized"] = float((scale > 1).sum())
            advantages = advantages * scale
        div_scale = apo.divergence_scale(advantages, correct, data.groups) if opts.dads \
            else torch.ones(len(data))
        credit = Credit(advantages, div_scale, self._dgpo_scale(data, temperature) if opts.algo == "dgpo" else None,
                        self._trace_routes(data, figures) if opts.algo == "trace" else None)
        if opts.tis_cap is not None:
            credit.token_old, credit.token_tis = self._truncated_importance(data, temperature, figures)
        keep = torch.ones(len(data), dtype=torch.bool)
        if opts.dynamic_sampling:
            keep = ~grpo.equal_reward_groups(data.rewards, data.groups)
        keep &= data.lengths > 0
        figures["groups_kept"] = float(len(set(data.groups[keep].tolist())))
        figures["groups_dropped"] = float(len(set(data.groups.tolist())) - figures["groups_kept"])
        return credit, keep.nonzero().squeeze(-1).tolist(), figures

    def state_dict(self) -> dict:
        """The update rule's own state, checkpointed with the run: the coefficient controller, RECAP's history."""
        state = {"kl_control": self.coefficient.state_dict()}
        if self.replay is not None and self.replay.weights is not None:
            state["replay_weights"] = self.replay.weights.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` from a checkpoint's extra state (keys it lacks keep their fresh state)."""
        if "kl_control" in state:
            self.coefficient.load_state_dict(state["kl_control"])
        if "replay_weights" in state and self.replay is not None and self.replay.weights is not None:
            self.replay.weights.load_state_dict(state["replay_weights"])

    def div_coef(self, data: ScoredRollouts) -> float:
        """The regularizer's coefficient for the next update (``--div-coef-schedule``)."""
        return self.coefficient.value(float(data.correct.mean()) if len(data) else 0.0)

    @torch.no_grad()
    def _per_response(self, data: ScoredRollouts, per_token, reduce: bool = True) -> torch.Tensor:
        """``per_token(rows, batch, hidden)`` over all responses in micro-batches under the current policy, summed
        per response (``reduce``) or concatenated per token."""
        parts = []
        for start in range(0, len(data), self.opts.micro_batch_size):
            rows = list(range(start, min(start + self.opts.micro_batch_size, len(data))))
            batch = self._batch(data.seqs, rows)
            values = per_token(rows, batch, self.lm.hidden(batch)).float().cpu()
            if reduce:
                values = torch.zeros(len(rows)).index_add_(
                    0, torch.arange(len(rows)).repeat_interleave(data.lengths[rows]), values)
            parts.append(values)
        return torch.cat(parts) if parts else torch.zeros(0)

    def _truncated_importance(self, data: ScoredRollouts, temperature: float,
                              figures: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(log π_old per token under the trainer's policy before this batch's updates, and each token's truncated
        importance weight against the sampler's log-probs, :func:`grpo.truncated_importance_weights`): the PPO
        ratio is then taken against the trainer's own π_old."""
        old = self._per_response(data, lambda rows, batch, hidden: engine.token_outputs(
            hidden, self.lm.weight, **self.head_options, token_ids=batch["token"],
            temperature=temperature).logprob, reduce=False)
        sampled = torch.from_numpy(np.concatenate(data.old_logprobs)) if len(data) else torch.zeros(0)
        weights, capped = grpo.truncated_importance_weights(old, sampled, self.opts.tis_cap)
        figures["tis_weight"] = float(weights.mean()) if len(weights) else 1.0
        figures["tis_capped_frac"] = float(capped.float().mean()) if len(weights) else 0.0
        return old, weights

    def _old_logprobs(self, data: ScoredRollouts, rows: list[int]) -> torch.Tensor:
        """The sampling policy's log-probs of the tokens of ``rows``, concatenated, on the model's device."""
        return _host_old_logprobs(data, rows).to(self.device)

    def _fdpg_advantages(self, data, rewards, correct, temperature, figures) -> torch.Tensor:
        """f-DPG: ``−(f′(u) − b)`` per response toward the target distribution (objectives/fdpg.py)."""
        ref = self._per_response(data, lambda rows, batch, hidden: self.reference.token_logprobs(
            data, rows, batch, temperature))
        policy = torch.tensor([float(lp.sum()) for lp in data.old_logprobs], dtype=torch.float64)
        target = fdpg.log_target(ref, rewards, correct, self.opts.fdpg_target, self.opts.beta)
        advantages, log_u = fdpg.advantages(self.opts.parsed_divergence(), policy, target, data.groups)
        figures["log_u"] = float(log_u.mean())
        return advantages

    def _trace_routes(self, data: ScoredRollouts, figures: dict) -> torch.Tensor:
        """TRACE: each token's route from the rollouts' spans (objectives/trace.py)."""
        if data.spans is None:
            raise UserError("--algo trace needs the rollouts' spans column")
        routes = trace.token_routes(data.spans, data.lengths.tolist(), data.correct, self.opts.error_kl_coef > 0)
        figures["key_tokens"] = float((routes == trace.KEY).sum())
        figures["error_tokens"] = float((routes == trace.ERROR).sum())
        return routes

    def _dgpo_scale(self, data: ScoredRollouts, temperature: float) -> torch.Tensor:
        """DGPO: each token's share of its response's advantage (objectives/dgpo.py)."""
        hellinger = divergences.get("hellinger")
        outputs: list[torch.Tensor] = []

        def guidance(rows, batch, hidden):
            out = engine.token_outputs(hidden, self.lm.weight, **self.head_options,
                                       entropy=True, target=self.reference.target(data, rows, batch),
                                       divergence=hellinger, temperature=temperature)
            outputs.append(out.entropy.float().cpu())
            return out.divergence

        deviation = self._per_response(data, guidance, reduce=False)
        entropy = torch.cat(outputs) if outputs else torch.zeros(0)
        return dgpo.token_scale(deviation, entropy, data.lengths, self.lm.weight.shape[0], self.opts.dgpo_lambda)

    # -- step 3-4: minibatch steps --------------------------------------------------------------------------------
    def steps(self, data: ScoredRollouts, kept: list[int], seed: int) -> list[list[int]]:
        """The responses of each optimizer step: ``ppo_epochs`` seeded shuffles of ``kept`` into minibatches."""
        size = self.opts.minibatch_size or max(1, len(kept))
        plan = []
        for epoch in range(self.opts.ppo_epochs):
            order = torch.randperm(len(kept), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
            plan += [[kept[i] for i in order[s : s + size]] for s in range(0, len(order), size)]
        return plan

    def step(self, trainer: Trainer, data: ScoredRollouts, credit: Credit, rows: list[int],
             temperature: float) -> dict:
        """One optimizer step on the responses ``rows`` (plus D_pef's term for DPH-RL and the replayed
        objectives)."""
        opts = self.opts
        replay_weights = self._replay_weights()
        routes = credit.routes(data, rows)
        scale = StepScale(int(data.lengths[rows].sum()), len(rows),
                          kd_coef=linear_anneal(opts.kd_coef, opts.kd_anneal, trainer.progress),
                          div_coef=self.div_coef(data), anneal=trace.kl_anneal(trainer.step, opts.kl_warmup),
                          key_tokens=max(1, int((routes == trace.KEY).sum())),
                          error_tokens=max(1, int((routes == trace.ERROR).sum())), task_weight=replay_weights[0])
        micro = [self._micro(data, credit, chunk, scale, temperature, factor)
                 for chunk, factor in self._rank_chunks(self._longest_first(data, rows))]
        if self.samples is not None and len(self.samples.seqs) and opts.eta:
            micro.append(self._pef_micro(trainer.step))
        if self.replay is not None:
            micro += [self._replay_micro(k, trainer.step, w) for k, w in enumerate(replay_weights[1:])]
        figures = trainer.update(micro)
        if opts.kd_on:
            figures["kd_coef"] = scale.kd_coef
        if opts.algo == "trace":
            figures["kl_anneal"] = scale.anneal
        if opts.div_coef_schedule != "constant":
            figures["div_coef"] = scale.div_coef
            self.coefficient.update(figures.get("divergence", 0.0), figures["entropy"], float(data.rewards.mean()))
        if self.replay is not None:
            self._record_replay(figures, replay_weights)
        return figures

    @staticmethod
    def _longest_first(data: ScoredRollouts, rows: list[int]) -> list[int]:
        """A step's responses longest first, so each micro-batch pads to little more than its own rows' length
        (in the step's shuffled order one long response pads its whole micro-batch).  The step's loss is a sum
        over all its tokens with the step's own weights (:class:`StepScale`), so which micro-batch a response
        falls in changes its update only by floating-point summation order."""
        lengths = data.seqs.lengths()
        return sorted(rows, key=lambda r: -lengths[r])

    def _rank_chunks(self, rows: list[int]) -> list[tuple[list[int], float]]:
        """This process's micro-batches of a step's responses, each with the factor of its loss.

        One process takes them all (factor 1).  Under torchrun rank r takes rows r, r + N, …; the token weights
        are the whole step's, so a rank's loss is its share of the step's sum, and the factor N undoes the
        trainer's averaging of the ranks' gradients: the update equals one process's.  Every rank runs the same
        number of micro-batches (FSDP's collectives must pair up): a rank short of rows repeats one with
        factor 0."""
        size, world = self.opts.micro_batch_size, self.world
        if not world.distributed:
            return [(rows[s : s + size], 1.0) for s in range(0, len(rows), size)]
        mine = rows[world.rank :: world.size]
        count = math.ceil(math.ceil(len(rows) / world.size) / size)
        chunks = [(mine[s : s + size], float(world.size)) for s in range(0, len(mine), size)]
        return chunks + [(rows[:1], 0.0)] * (count - len(chunks))

    # -- RECAP: replayed objectives -------------------------------------------------------------------------------
    def _replay_weights(self) -> list[float]:
        """The weights of [the RL task, each replayed objective] for the next step (all 1 without RECAP)."""
        if self.replay is None:
            return [1.0]
        if self.replay.weights is None:
            return [1.0] * (1 + len(self.replay.sets))
        return self.replay.weights.weights()

    def _record_replay(self, figures: dict, weights: list[float]) -> None:
        """Log the step's weights and feed RECAP the signals measured in it: the task's NLL of positive-advantage
        tokens (when the step had any) and each replayed loss."""
        positive = figures.pop("positive_tokens", 0.0)
        task_signal = figures.pop("positive_nll", 0.0) / positive if positive else None
        figures["weight_task"] = weights[0]
        for k, weight in enumerate(weights[1:]):
            figures[f"weight_replay_{k}"] = weight
        if self.replay.weights is not None:
            if task_signal is not None:
                figures["task_signal"] = task_signal
            self.replay.weights.update([task_signal] + [figures[f"replay_loss_{k}"]
                                                        for k in range(len(self.replay.sets))])

    def _replay_micro(self, k: int, step: int, weight: float):
        """``weight · --replay-coef · L_k`` on this step's batch of replayed table ``k`` (a seeded cycle): the mean
        cross-entropy of its completion tokens, or their mean closed-form divergence to the reference."""
        seqs, replay = self.replay.sets[k], self.replay
        rows = batches_for_step(len(seqs), step, LoopOptions(batch_size=replay.batch_size,
                                                             seed=self.opts.loop.seed + k))[0]

        def micro():
            batch = self._batch(seqs, rows)
            target = None
            if replay.divergence is not None:
                target = self.reference.model.target(self.reference.model.hidden(batch))
            value, _ = kd.kd_loss(kd.KDBatch(self.lm.hidden(batch), batch["token"], target),
                                  self.lm.weight, self.lm.bias, replay.divergence,
                                  chunk_size=self.opts.chunk_size, softcap=self.lm.softcap)
            loss = weight * replay.coef * value
            return loss, {f"replay_loss_{k}": float(value.detach()), "loss": float(loss.detach())}

        return micro

    def _batch(self, seqs: Sequences, rows: list[int]) -> dict[str, torch.Tensor]:
        return seqs.batch(rows, self.pad_id, device=self.device)

    def _divergence(self, data, rows, batch, hidden, temperature, logprob) -> torch.Tensor:
        """Per-token regularizer estimate (no grad needed): closed form (``full``) or a sample estimator."""
        if self.opts.div_estimator == "full":
            target = self.reference.target(data, rows, batch)
            return engine.token_outputs(hidden, self.lm.weight, **self.head_options,
                                        target=target, divergence=self.regularizer,
                                        temperature=temperature).divergence
        ref = self.reference.token_logprobs(data, rows, batch, temperature)
        return sample_divergence(self.regularizer, logprob, ref, self.opts.div_estimator)

    def _kd_mask(self, data: ScoredRollouts, rows: list[int]) -> torch.Tensor:
        """KDRL's reward-guided mask, per response: 1 where the KD term applies (``--kd-mask``)."""
        correct = torch.from_numpy(data.correct[rows])
        mask = {"all": torch.ones_like(correct), "incorrect": ~correct, "correct": correct}[self.opts.kd_mask]
        return mask.float()

    def _micro(self, data: ScoredRollouts, credit: Credit, rows: list[int], scale: StepScale, temperature: float,
               factor: float = 1.0):
        """One micro-batch's share of the minibatch loss ω Σ_t w_t [g_t L_t + c·d·D_t + β·m·KD_t + a λ_t R_t
        − c_H·H_t], through :func:`fdivctl.engine.token_loss` (gradient taken in the forward pass, no
        ``[tokens, V]`` logits).

        ``d`` is the response's divergence weight (APO's DADS, else 1); ``KD_t`` is KDRL's per-token estimate
        of KL(π_θ‖π_teacher) on the policy's own samples (k2, k3, or the closed form), ``m`` its reward-guided
        mask and ``β`` the (annealed) ``kd_coef``; ``R_t`` is TRACE's routed KL with ``g_t = 1 − a [routed]``
        (else ``g_t = 1``); ω is RECAP's weight of the task.  The loss and its figures are multiplied by
        ``factor`` (:meth:`_rank_chunks`)."""
        opts = self.opts
        n_tokens, kd_coef, div_coef = scale.n_tokens, scale.kd_coef, scale.div_coef
        regularize = self.regularizer is not None and opts.div_in == "loss" and opts.algo != "dph"
        full = regularize and opts.div_estimator == "full"
        mixture = opts.algo == "rlad"
        distill = opts.kd_on
        kd_full = distill and opts.kd_estimator == "full"
        rkl = divergences.get("rkl")

        def micro():
            lengths = data.lengths[rows]
            route = credit.routes(data, rows)
            # TRACE reads its teacher while the KL channel is open and this micro-batch has routed tokens (under
            # torchrun always: the self-teacher's forward through the sharded policy is a collective)
            routing = opts.algo == "trace" and scale.anneal > 0 and \
                (bool((route != trace.GRPO).any()) or self.world.distributed)
            # the per-token constants, made on the host and copied to the device at once, before the forwards
            host = {"sampled": _host_old_logprobs(data, rows), "adv": credit.token_advantages(data, rows),
                    "div_scale": credit.div_scale[rows].repeat_interleave(lengths),
                    "weights": grpo.token_weights(lengths, n_tokens, scale.n_seqs, opts.loss_agg),
                    # TRACE: routed tokens hand (1 − a) of their weight to the KL channel; λ_t per route
                    "pg_share": 1.0 - scale.anneal * (route != trace.GRPO).float(),
                    "kl_coef": scale.anneal * (opts.key_kl_coef * (route == trace.KEY).float()
                                               + opts.error_kl_coef * (route == trace.ERROR).float())}
            for name, vector in (("old", credit.old_logprobs(data, rows)), ("tis", credit.tis_weights(data, rows))):
                if vector is not None:
                    host[name] = vector
            if distill:
                host["kd_mask"] = self._kd_mask(data, rows).repeat_interleave(lengths)
            on_device = upload_vectors(host, self.device)
            sampled, adv, div_scale, weights = (on_device[k] for k in ("sampled", "adv", "div_scale", "weights"))
            pg_share, kl_coef, kd_mask = on_device["pg_share"], on_device["kl_coef"], on_device.get("kd_mask")
            old = on_device.get("old", sampled)
            tis = on_device.get("tis", torch.ones_like(old))
            route = upload(route, self.device) if routing else None
            batch = self._batch(data.seqs, rows)
            hidden = self.lm.hidden(batch)
            target = self.reference.target(data, rows, batch) if full else None
            ref = self.reference.token_logprobs(data, rows, batch, temperature) if regularize and not full else None
            if kd_full:
                target = self.teacher.target(data, rows, batch)
            teacher = self.teacher.token_logprobs(data, rows, batch, temperature) \
                if (distill and not kd_full) or mixture else None
            # the ratio's denominator: π_old, or RLAD's teacher–old mixture
            denominator = rlad.mixture_logprob(teacher, old, opts.mix_lambda) if mixture else old
            if routing:
                target = self._trace_target(data, rows, batch)
            positive = adv > 0
            # each term's per-token coefficient, made once per micro-batch: a chunk's objective only slices it
            coefs = {"pg_loss": weights * pg_share * tis}
            if regularize:
                coefs["divergence"] = div_coef * weights * div_scale
            if distill:
                coefs["kd"] = kd_coef * weights * kd_mask
            if routing:
                coefs["routed_kl"] = weights * kl_coef
            if opts.entropy_coef:
                coefs["entropy"] = -opts.entropy_coef * weights

            def terms(out, r):
                """The loss's per-token terms on the tokens ``r`` (the objective weighs them by ``coefs``; the
                figures sum them over the micro-batch once its sweep is done) and the tokens clipped."""
                surrogate, clipped = grpo.clipped_surrogate(out["logprob"], denominator[r], adv[r], opts.clip_low,
                                                            opts.clip_high)
                values = {"pg_loss": surrogate}
                if regularize:
                    values["divergence"] = out["divergence"] if full else \
                        sample_divergence(self.regularizer, out["logprob"], ref[r], opts.div_estimator)
                if distill:
                    values["kd"] = out["divergence"] if kd_full else \
                        sample_divergence(rkl, out["logprob"], teacher[r], opts.kd_estimator)
                if routing:
                    values["routed_kl"] = out["divergence"]
                if opts.entropy_coef:
                    values["entropy"] = out["entropy"]
                return values, clipped

            def objective(out, r):
                values, _ = terms(out, r)
                first, *rest = ((coefs[name][r] * value).sum() for name, value in values.items())
                return sum(rest, first)

            target_divergence = trace.RoutedKL(route) if routing else rkl if kd_full else \
                self.regularizer if full else None
            loss, out = engine.token_loss(hidden, self.lm.weight, objective, **self.head_options,
                                          token_ids=batch["token"], entropy=True, target=target,
                                          divergence=target_divergence, temperature=temperature)
            loss = scale.task_weight * loss
            with torch.no_grad():
                values, clipped = terms({"logprob": out.logprob, "entropy": out.entropy, "divergence": out.divergence},
                                        slice(None))
                sums = {"pg_loss": (coefs["pg_loss"] * values["pg_loss"]).sum(), "clipped": clipped.sum(),
                        "entropy": out.entropy.sum(),
                        # |log π_θ − log π_old| per token: ~0 on a step's first on-policy pass unless the sampler's
                        # weights or numerics differ from the trainer's
                        "logprob_gap": (out.logprob - sampled).abs().sum(), "loss": loss.detach()}
                if regularize:
                    sums["divergence"] = values["divergence"].sum()
                if distill:
                    sums["kd"] = (kd_mask * values["kd"]).sum()
                    sums["kd_tokens"] = kd_mask.sum()
                if routing:
                    sums["key_kl"] = (values["routed_kl"] * (route == trace.KEY)).sum()
                    sums["error_kl"] = (values["routed_kl"] * (route == trace.ERROR)).sum()
                if self.replay is not None:
                    sums["positive_nll"] = -(out.logprob * positive).sum()
                    sums["positive_tokens"] = positive.sum()
                # one device → host copy for all of them (each float() of a device tensor waits for the device)
                host = dict(zip(sums, torch.stack([v.float() for v in sums.values()]).tolist()))
            figures = {"tokens": float(len(adv)), "pg_loss": host["pg_loss"], "clip_frac": host["clipped"] / n_tokens,
                       "entropy": host["entropy"] / n_tokens, "logprob_gap": host["logprob_gap"] / n_tokens,
                       "loss": host["loss"]}
            if regularize:
                figures["divergence"] = host["divergence"] / n_tokens
            if distill:
                figures["kd"] = host["kd"] / n_tokens
                figures["kd_tokens"] = host["kd_tokens"]
            if opts.algo == "trace":
                figures["key_kl"] = host.get("key_kl", 0.0) / scale.key_tokens
                figures["error_kl"] = host.get("error_kl", 0.0) / scale.error_tokens
            if self.replay is not None:
                figures["positive_nll"] = host["positive_nll"]
                figures["positive_tokens"] = host["positive_tokens"]
            if factor != 1.0:
                figures = {k: v if k == "tokens" and factor else v * factor for k, v in figures.items()}
            return factor * loss, figures

        return micro

    def _trace_target(self, data: ScoredRollouts, rows: list[int], batch: dict) -> engine.Target:
        """TRACE's teacher on the tokens of ``rows``: a store, a teacher model, or the policy itself (no gradient) —
        the models after each row's privileged prompt when the rollouts have one."""
        if self.teacher is not None and self.teacher.store is not None:
            return self.teacher.target(data, rows, batch)
        teacher_batch = batch if data.privileged is None else self._batch(data.privileged, rows)
        if self.teacher is not None:
            return self.teacher.model.target(self.teacher.model.hidden(teacher_batch))
        with torch.no_grad():
            hidden = self.lm.hidden(teacher_batch)
        bias = self.lm.bias
        return engine.TeacherHead(hidden, self.lm.weight.detach(), None if bias is None else bias.detach(),
                                  softcap=self.lm.softcap)

    def _pef_micro(self, step: int):
        """η · L_pef on the reference samples of this step (a seeded cycle through them)."""
        samples, opts = self.samples, self.opts
        rows = batches_for_step(len(samples.seqs), step,
                                LoopOptions(batch_size=opts.pef_batch_size, seed=opts.loop.seed))[0]

        def micro():
            batch = self._batch(samples.seqs, rows)
            reference = torch.from_numpy(np.concatenate([samples.logprobs[r] for r in rows])).to(self.device)
            n = len(reference)
            pef, _ = engine.token_loss(
                self.lm.hidden(batch), self.lm.weight,
                lambda out, r: dph.reference_loss(self.regularizer, out["logprob"], reference[r]).sum() / n,
                **self.head_options, token_ids=batch["token"], temperature=samples.temperature)
            loss = opts.eta * pef
            return loss, {"pef_loss": float(pef.detach()), "loss": float(loss.detach())}

        return micro


def _host_old_logprobs(data: ScoredRollouts, rows: list[int]) -> torch.Tensor:
    """The sampling policy's log-probs of the tokens of ``rows``, concatenated, on the host."""
    return torch.from_numpy(np.concatenate([data.old_logprobs[r] for r in rows]))
