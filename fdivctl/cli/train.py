"""``fdivctl train``: RL with verifiable rewards (GRPO, Dr.GRPO, DAPO, DPH-RL), f-DPO and SFT."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from fdivctl.cli.options import (
    CHUNK_SIZE,
    DIST_BACKEND,
    GRAD_CHECKPOINTING,
    GROUP_BY_LENGTH,
    LORA_ALPHA,
    LORA_DROPOUT,
    LORA_R,
    MAX_GRAD_NORM,
    TENSORBOARD,
    TRAIN_DTYPE,
)
from fdivctl.cli.progress import progress_bar
from fdivctl.errors import UserError
from fdivctl.generation.sampling import SamplingOptions
from fdivctl.objectives.kd import SFT_PREFIX
from fdivctl.rewards.verifiers import make_reward
from fdivctl.stages.distill import DistillOptions, run_distill
from fdivctl.stages.dph_partition import run_partition
from fdivctl.stages.preference import FDPOOptions, run_fdpo
from fdivctl.stages.rl_options import RLOptions
from fdivctl.stages.rollout import RolloutOptions
from fdivctl.stages.train_rl import OnlineOptions, run_online, run_staged
from fdivctl.training.distributed import is_main
from fdivctl.training.loop import LoopOptions
from fdivctl.training.lora import LoraOptions

ALGOS = ("grpo", "drgrpo", "dapo", "dph", "rlad", "dgpo", "fdpg", "trace", "fdpo", "sft")


def command(
    policy: Path = typer.Argument(..., help="Policy model directory (save_pretrained format): the initial policy."),
    out: Path = typer.Argument(..., help="Checkpoint directory to write (HF format + fdivctl_state/); with "
                               "--partition, the partition directory."),
    algo: str = typer.Option("grpo", help="grpo | drgrpo (no std, no length normalisation) | dapo (clip-higher, "
                             "token-mean, dynamic sampling, overlong penalty) | dph (DPH-RL) | rlad (ratio against "
                             "a teacher–old-policy mixture; --teacher, --mix-lambda) | dgpo (advantage redistributed over tokens by "
                             "entropy-gated Hellinger deviation from the reference; no KL penalty) | fdpg (f-DPG: "
                             "approach the target --target with --divergence) | trace (staged: KL to a teacher on the rollouts' "
                             "annotated spans, GRPO elsewhere) | fdpo (preference pairs) | sft "
                             "(cross-entropy on prompt/completion)."),
    rollouts: Path = typer.Option(None, help="Staged mode: scored rollouts Parquet (rollout → score); the old "
                                  "policy's log-probs are its completion_logprobs."),
    prompts: Path = typer.Option(None, help="Online mode (and --partition): prompts Parquet with prompt_id, prompt "
                                 "(text or messages) or messages, and the verifier's columns (e.g. answer)."),
    pairs: Path = typer.Option(None, help="--algo fdpo: `fdivctl pairs` of scored rollouts (their token ids), or "
                               "Parquet with prompt, chosen, rejected (text; without "
                               "prompt, the text chosen and rejected open with is the prompt), or conversational "
                               "pairs (messages: prompt + the replies, or whole chosen/rejected conversations sharing "
                               "their opening); optional ref_chosen_logp / ref_rejected_logp (or TRL's "
                               "ref_chosen_logps / ref_rejected_logps)."),
    data: Path = typer.Option(None, help="--algo sft: sequences Parquet (prompt/completion text, token ids, "
                         "plain text: a loss on every token, or messages: a loss on each assistant reply)."),
    verifier: list[str] = typer.Option(None, "--verifier", help="Online and --partition: math | math-verify | "
                                       "exact | regex | sql | python:MODULE:FUNC | trl:MODULE:FUNC (as in `fdivctl "
                                       "score`; default math); repeat it to sum "
                                       "several rewards, the first one's deciding correct and pass rates."),
    reward_weights: str = typer.Option(None, help="Weights of the repeated --verifier rewards, comma-separated "
                                       "(default 1 each)."),
    pattern: str = typer.Option(None, help="Regex for --verifier regex (default: the row's answer column)."),
    answer_column: str = typer.Option(None, help="Column of the gold answer that math, math-verify, exact, sql "
                                      "and a regex without --pattern read (default: answer; e.g. solution)."),
    iterations: int = typer.Option(10, help="Online: sample → score → update iterations."),
    prompts_per_iteration: int = typer.Option(8, help="Online: prompts sampled per iteration."),
    prompt_sampling: str = typer.Option("uniform", help="Online: how each iteration's prompts are chosen — uniform "
                                        "(seeded shuffle) or gaussian (FG-ExPO's curriculum: weights "
                                        "exp(−(acc − μ)²/2σ²) from each prompt's last measured accuracy; unseen "
                                        "prompts take their pass_rate column, else μ)."),
    gcs_mu: float = typer.Option(0.5, help="--prompt-sampling gaussian: μ, the accuracy given the most weight."),
    gcs_sigma: float = typer.Option(0.2, help="--prompt-sampling gaussian: σ, the width of the weights."),
    group_size: int = typer.Option(8, help="Online: samples per prompt (the GRPO group)."),
    temperature: float = typer.Option(1.0, help="Sampling temperature; log-probs are taken at it too (staged: "
                                      "the rollouts' recorded temperature)."),
    top_p: float = typer.Option(1.0, help="Online sampling nucleus mass."),
    max_new_tokens: int = typer.Option(256, help="Online sampling: longest completion in tokens."),
    stop: list[str] = typer.Option(None, "--stop", help="Online sampling stop string (repeatable)."),
    chat: bool = typer.Option(False, help="Wrap text prompts in the tokenizer's chat template, as rollout --chat "
                              "does: online --prompts, --partition, and the text tables of --algo sft (--data) and "
                              "fdpo (--pairs). Staged --rollouts were encoded when sampled: give --chat there."),
    max_length: int = typer.Option(None, help="--algo sft and fdpo: cut each sequence of --data (each response of "
                                   "--pairs) to this many tokens, prompt + completion, keeping its start (TRL's "
                                   "max_length): the completion is cut, and a row whose prompt alone fills it is "
                                   "dropped; the summary counts both. Default: refuse a sequence longer than the "
                                   "model's context."),
    backend: str = typer.Option("hf", help="Online sampling: hf (the training model itself), vllm (one engine, "
                                "updated weights loaded into it each iteration), or auto (vllm on CUDA when "
                                "installed)."),
    score_workers: int = typer.Option(2, help="Verifier processes."),
    clip_low: float = typer.Option(None, help="PPO clip ε_low (default 0.2)."),
    clip_high: float = typer.Option(None, help="PPO clip ε_high (DAPO clip-higher; default 0.2, dapo/dph 0.28)."),
    loss_agg: str = typer.Option(None, help="token-mean | seq-mean-token-sum | seq-mean-token-mean (default by "
                                 "--algo: grpo seq-mean-token-mean, drgrpo seq-mean-token-sum, dapo token-mean)."),
    std_norm: bool = typer.Option(None, "--std-norm/--no-std-norm", help="Divide advantages by the group's std "
                                  "(off for drgrpo)."),
    dynamic_sampling: bool = typer.Option(None, "--dynamic-sampling/--no-dynamic-sampling",
                                          help="Drop groups whose rewards are all equal (on for dapo)."),
    overlong_penalty: float = typer.Option(None, help="DAPO soft overlong penalty zone, as a share of the maximum "
                                           "length (0 = off; dapo 0.2)."),
    entropy_coef: float = typer.Option(0.0, help="Entropy bonus coefficient."),
    tis_cap: float = typer.Option(None, help="Truncated importance sampling (TIS, Yao et al. 2025) for a sampler "
                                  "whose probabilities differ from the trainer's (vLLM, another precision, an "
                                  "older checkpoint): recompute π_old with the policy before the updates, take the "
                                  "PPO ratio against it, and weight each token's policy-gradient term by "
                                  "min(π_old/π_sampler, C) with this C (e.g. 2). Logs tis_weight and "
                                  "tis_capped_frac."),
    ppo_epochs: int = typer.Option(1, help="Passes over each batch of rollouts."),
    minibatch_size: int = typer.Option(None, help="Responses per optimizer step (default: all of the batch)."),
    micro_batch_size: int = typer.Option(8, help="Responses per forward pass (memory; does not change the update); "
                                         "a step's responses fill them longest first."),
    chunk_size: int = CHUNK_SIZE,
    divergence: str = typer.Option("none", help="Regularizer toward the reference: none or a registry divergence "
                                   "(rkl, fkl, jsd, alpha, hellinger, tv, …; params as jsd:beta=0.3). --algo dph: "
                                   "the D_pef divergence (fkl default, jsd, alpha); fdpo: rkl (DPO), fkl, jsd, "
                                   "alpha; sft: the f-divergence SFT objective against the reference (rkl = plain "
                                   "SFT; jsd, hellinger, tv, alpha keep the reference term)."),
    div_coef: float = typer.Option(0.04, help="Coefficient of the regularizer."),
    div_estimator: str = typer.Option("k3", help="k1 | k2 | k3 | abs | k3+ (sample estimators; k2/abs/k3+ for rkl "
                                      "only) | full (closed form over the vocabulary through the engine)."),
    div_in: str = typer.Option("loss", help="Place the regularizer in the loss or in the reward."),
    ref_model: Path = typer.Option(None, help="Reference model (default: the initial policy)."),
    ref_logits: Path = typer.Option(None, help="Staged mode: reference from a teacher-logits store of the rollouts."),
    teacher: Path = typer.Option(None, help="KDRL: a teacher model; adds β·KL(π‖teacher) on the policy's own "
                                 "samples to the GRPO-family loss. rlad: the ratio's teacher. trace: the span "
                                 "teacher (default: the policy itself under the privileged_prompt column)."),
    teacher_logits: Path = typer.Option(None, help="KDRL, staged mode: the teacher from a teacher-logits store of "
                                        "the rollouts (with --kd-estimator full, or k2/k3 from its token log-probs)."),
    kd_coef: float = typer.Option(5e-3, help="KDRL: β, the KD coefficient (at the start when --kd-anneal is set)."),
    kd_anneal: float = typer.Option(None, help="KDRL: β at the end of the run, reached linearly (KDRL: 5e-3 → 1e-3); "
                                    "default constant."),
    kd_estimator: str = typer.Option("k2", help="KDRL: k2 | k3 (sample estimators of KL(π‖teacher); k2 is what "
                                     "KDRL found better) | full (closed form over the vocabulary)."),
    mix_lambda: float = typer.Option(0.5, help="--algo rlad: λ of the ratio's denominator λ·π_teacher + "
                                     "(1 − λ)·π_old (0 = GRPO)."),
    div_coef_schedule: str = typer.Option("constant", help="Coefficient of --divergence per update: constant "
                                          "(--div-coef) | akl (FG-ExPO: --div-coef·σ(κ(ā − a₀)), ā the batch's mean "
                                          "accuracy) | pid (SAFE: entropy-gated, PID-controlled KL threshold; "
                                          "2·--div-coef·φ·(K̄ − τ)₊)."),
    akl_center: float = typer.Option(0.5, help="--div-coef-schedule akl: a₀, the accuracy at half the coefficient."),
    akl_sharpness: float = typer.Option(10.0, help="--div-coef-schedule akl: κ, the logistic's slope."),
    kl_threshold: float = typer.Option(0.3, help="--div-coef-schedule pid: τ_base, the KL threshold the PID moves "
                                       "(clamped to [0.1, 0.6])."),
    target_entropy: float = typer.Option(2.0, help="--div-coef-schedule pid: H*, the entropy (nats) below which the "
                                         "KL penalty is amplified (gate φ = max(0.5, H*/(H̄ + 0.1)))."),
    dads: bool = typer.Option(False, help="APO's DADS: weight the divergence term of positive-advantage responses "
                              "by 1 − exp(−e(1 − d)), d = 1 − the group's accuracy."),
    stcr: bool = typer.Option(False, help="APO's STCR: scale the advantage of incorrect responses longer than their "
                              "group's mean correct length by 2 − 1.00001^(−excess tokens)."),
    dgpo_lambda: float = typer.Option(0.5, help="--algo dgpo: λ, the share of the advantage redistributed by the "
                                      "gated scores (0 = GRPO)."),
    target: str = typer.Option("ref*exp(r/beta)", help="--algo fdpg: the target distribution — ref*exp(r/beta) "
                               "(with --beta) or ref*filter (the reference restricted to correct responses)."),
    key_kl_coef: float = typer.Option(1.0, help="--algo trace: λ_key, the weight of KL(teacher‖π) on key spans of "
                                      "correct rollouts."),
    error_kl_coef: float = typer.Option(0.0, help="--algo trace: λ_error, the weight of KL(π‖teacher) on error spans "
                                        "of incorrect rollouts (0 = off)."),
    kl_warmup: int = typer.Option(None, help="--algo trace: W, the optimizer steps over which the span KL fades "
                                  "linearly to 0 (routed tokens return to GRPO); default: no fading."),
    replay: list[Path] = typer.Option(None, "--replay", help="RECAP: a general-domain sequences Parquet (prompt/"
                                      "completion text or token ids) replayed with its own objective each step "
                                      "(repeatable: one objective per file)."),
    replay_objective: str = typer.Option("sft", help="--replay: sft (cross-entropy on the completions) or a registry "
                                         "divergence to the reference on them (e.g. rkl; closed form)."),
    replay_coef: float = typer.Option(1.0, help="--replay: the replayed objectives' coefficient."),
    replay_batch_size: int = typer.Option(8, help="--replay: rows of each replayed table per optimizer step."),
    replay_weighting: str = typer.Option("fixed", help="fixed (every objective weight 1) | recap (weights K·softmax "
                                         "of convergence + instability over the last --recap-window steps)."),
    recap_window: int = typer.Option(4, help="--replay-weighting recap: W, steps of signal history (uniform weights "
                                     "until every objective has W)."),
    recap_temperature: float = typer.Option(1.0, help="--replay-weighting recap: T of the softmax."),
    kd_mask: str = typer.Option("all", help="KDRL's reward-guided masking: the responses the KD term applies to — "
                                "all, incorrect (KD masked out on correct responses, as KDRL) or correct."),
    partition: bool = typer.Option(False, help="--algo dph: pre-sample --k + 1 completions per prompt, split "
                                   "D_pef / D_exp, store the reference samples in OUT; no training."),
    partition_dir: Path = typer.Option(None, help="--algo dph: the directory written by --partition."),
    k: int = typer.Option(8, "--k", help="--partition: samples per prompt judged (plus one confirming sample)."),
    pef_threshold: float = typer.Option(0.875, help="--partition: accuracy over k that puts a prompt in D_pef."),
    eta: float = typer.Option(0.1, help="--algo dph: weight η of the D_pef divergence."),
    pef_batch_size: int = typer.Option(8, help="--algo dph: reference samples per optimizer step."),
    beta: float = typer.Option(0.1, help="--algo fdpo: β; --algo fdpg: the temperature β of ref*exp(r/beta)."),
    nll_coef: float = typer.Option(0.0, help="--algo fdpo: α of Iterative RPO's DPO+NLL (Pang et al. 2024): adds "
                                   "α × the chosen responses' NLL per token, which keeps their likelihood from "
                                   "falling with the rejected ones' (the paper: α = 1; TRL: rpo_alpha). 0: f-DPO "
                                   "alone."),
    lr: float = typer.Option(1e-6, help="Peak learning rate (AdamW)."),
    lr_schedule: str = typer.Option("constant", help="constant, linear or cosine decay after warm-up."),
    warmup: int = typer.Option(0, help="Warm-up length (optimizer steps; online: iterations)."),
    batch_size: int = typer.Option(8, help="fdpo / sft: examples per micro-batch."),
    grad_accum: int = typer.Option(1, help="fdpo / sft: micro-batches per optimizer step (sft: the step's loss is the "
                                   "mean over all their tokens; fdpo: over all their pairs)."),
    max_steps: int = typer.Option(None, help="fdpo / sft: optimizer steps (default: --epochs over the data)."),
    epochs: int = typer.Option(1, help="fdpo / sft: passes over the data."),
    seed: int = typer.Option(0, help="Seed of sampling, prompt choice and minibatch order."),
    max_grad_norm: float = MAX_GRAD_NORM,
    save_every: int = typer.Option(None, help="Checkpoint every N steps (online: iterations; default: online 1, "
                                   "else only at the end)."),
    log_jsonl: Path = typer.Option(None, help="Append one JSON line per step (online: per iteration): reward, "
                                   "accuracy, pass histogram, entropy, divergence, clip fraction, length, tokens/s."),
    tensorboard: Path = TENSORBOARD,
    resume: bool = typer.Option(False, help="Continue the run in OUT from its last checkpoint."),
    grad_checkpointing: bool = GRAD_CHECKPOINTING,
    group_by_length: bool = GROUP_BY_LENGTH,
    dist_backend: str = DIST_BACKEND,
    lora_r: int = LORA_R,
    lora_alpha: float = LORA_ALPHA,
    lora_dropout: float = LORA_DROPOUT,
    dtype: str = TRAIN_DTYPE,
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    allow_tokenizer_mismatch: bool = typer.Option(False, help="UNSAFE: skip the tokenizer hash checks."),
    allow_prompt_mismatch: bool = typer.Option(False, help="Staged: use a --ref-logits/--teacher-logits store made "
                                               "from other prompts than the rollouts' (its teacher saw hints or a "
                                               "system prompt the policy does not)."),
) -> None:
    """Train a policy: GRPO family / DPH-RL (staged on scored rollouts, or online), f-DPO on pairs, or SFT."""
    if algo not in ALGOS:
        raise UserError(f"--algo {algo!r}; valid: {', '.join(ALGOS)}")
    loop = LoopOptions(lr=lr, lr_schedule=lr_schedule, warmup=warmup, batch_size=batch_size, grad_accum=grad_accum,
                       max_steps=max_steps, epochs=epochs, seed=seed, max_grad_norm=max_grad_norm,
                       save_every=save_every or 0, log_jsonl=log_jsonl, tensorboard=tensorboard, resume=resume,
                       grad_checkpointing=grad_checkpointing, group_by_length=group_by_length,
                       dist_backend=dist_backend,
                       lora=LoraOptions(r=lora_r, alpha=lora_alpha, dropout=lora_dropout))
    loop.check()  # before any file is read
    sampling = SamplingOptions(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                               stop=list(stop or []))
    if partition:
        if algo != "dph" or prompts is None:
            raise UserError("--partition belongs to --algo dph and needs --prompts")
        with progress_bar("pre-sample", "samples") as progress:
            task = progress.add_task("pre-sample", total=None)
            reward = make_reward(verifier, reward_weights, pattern=pattern, answer_column=answer_column)
            summary = run_partition(policy, prompts, out, reward, k, pef_threshold,
                                    RolloutOptions(sampling=sampling, backend="hf", dtype=dtype, device=device,
                                                   chat=chat), workers=score_workers,
                                    on_batch=lambda s, t: progress.advance(task, s), dist_backend=dist_backend)
        if is_main():
            typer.echo(json.dumps({"partition": str(out), **{k_: v for k_, v in summary.items()
                                                             if k_ != "pef_prompt_ids"}}))
        return
    given = {"--rollouts": rollouts, "--prompts": prompts, "--pairs": pairs, "--data": data}
    wanted = {"fdpo": "--pairs", "sft": "--data"}.get(algo)
    inputs = [name for name, value in given.items() if value is not None]
    if wanted and inputs != [wanted]:
        raise UserError(f"--algo {algo} reads {wanted} (and no other input)")
    if not wanted and len([i for i in inputs if i in ("--rollouts", "--prompts")]) != 1 or \
            (not wanted and any(i in ("--pairs", "--data") for i in inputs)):
        raise UserError(f"--algo {algo}: give --rollouts (staged) or --prompts (online), one of them")
    if group_by_length and algo not in ("sft", "fdpo"):
        raise UserError("--group-by-length groups fixed sequences: --algo sft's --data and fdpo's --pairs")
    if nll_coef and algo != "fdpo":
        raise UserError("--nll-coef is RPO's NLL term of --algo fdpo")
    if max_length is not None and algo not in ("sft", "fdpo"):
        raise UserError("--max-length cuts fixed sequences: --algo sft's --data and fdpo's --pairs")
    if chat and rollouts is not None:
        raise UserError("--chat wraps text prompts; --rollouts holds token ids, encoded when they were sampled (give "
                        "--chat to that rollout)")
    with progress_bar(f"train {algo}", "steps") as progress:
        task = progress.add_task(f"train {algo}", total=None)

        def on_step(step, total, figures):
            shown = figures.get("reward_mean", figures.get("loss", float("nan")))
            label = "reward" if "reward_mean" in figures else "loss"
            progress.update(task, completed=step, total=total, description=f"train {algo} {label} {shown:.4f}")

        if algo == "sft":
            if ref_logits is not None:
                raise UserError("--algo sft reads its reference from --ref-model (default: the initial policy), "
                                "not --ref-logits")
            f_sft = divergence != "none"
            summary = run_distill(policy, out, data,
                                  DistillOptions(loss=SFT_PREFIX + divergence if f_sft else "ce", dtype=dtype,
                                                 device=device, allow_tokenizer_mismatch=allow_tokenizer_mismatch,
                                                 chat=chat, max_length=max_length, loop=loop),
                                  teacher=(ref_model or policy) if f_sft else None, on_step=on_step)
        elif algo == "fdpo":
            summary = run_fdpo(policy, pairs, out, FDPOOptions(divergence="rkl" if divergence == "none" else
                                                               divergence, beta=beta, nll_coef=nll_coef, dtype=dtype,
                                                               device=device, chat=chat, max_length=max_length,
                                                               loop=loop,
                                                               allow_tokenizer_mismatch=allow_tokenizer_mismatch),
                             on_step=on_step)
        else:
            opts = RLOptions(algo=algo, clip_low=clip_low, clip_high=clip_high, loss_agg=loss_agg, std_norm=std_norm,
                             dynamic_sampling=dynamic_sampling, overlong_penalty=overlong_penalty,
                             entropy_coef=entropy_coef, tis_cap=tis_cap, ppo_epochs=ppo_epochs,
                             minibatch_size=minibatch_size,
                             micro_batch_size=micro_batch_size, chunk_size=chunk_size, divergence=divergence,
                             div_coef=div_coef,
                             div_estimator=div_estimator, div_in=div_in, ref_model=ref_model, ref_logits=ref_logits,
                             partition_dir=partition_dir, eta=eta, pef_batch_size=pef_batch_size,
                             teacher=teacher, teacher_logits=teacher_logits, kd_coef=kd_coef, kd_anneal=kd_anneal,
                             kd_estimator=kd_estimator, kd_mask=kd_mask, mix_lambda=mix_lambda,
                             div_coef_schedule=div_coef_schedule, akl_center=akl_center, akl_sharpness=akl_sharpness,
                             kl_threshold=kl_threshold, target_entropy=target_entropy, dads=dads, stcr=stcr,
                             dgpo_lambda=dgpo_lambda, fdpg_target=target, beta=beta, key_kl_coef=key_kl_coef,
                             error_kl_coef=error_kl_coef, kl_warmup=kl_warmup, replay=list(replay or []),
                             replay_objective=replay_objective, replay_coef=replay_coef,
                             replay_batch_size=replay_batch_size, replay_weighting=replay_weighting,
                             recap_window=recap_window, recap_temperature=recap_temperature, dtype=dtype,
                             device=device, allow_tokenizer_mismatch=allow_tokenizer_mismatch,
                             allow_prompt_mismatch=allow_prompt_mismatch, loop=loop)
            if rollouts is not None:
                summary = run_staged(policy, rollouts, out, opts, on_step=on_step)
                if not summary["responses_kept"] and is_main():
                    typer.echo(f"fdivctl: warning: no response of {rollouts} was trained on (every group's rewards "
                               "were equal, which --dynamic-sampling drops, or its completions were empty): no step "
                               f"was taken, and {out} holds the starting policy", err=True)
            else:
                online = OnlineOptions(iterations=iterations, prompts_per_iteration=prompts_per_iteration,
                                       prompt_sampling=prompt_sampling, gcs_mu=gcs_mu, gcs_sigma=gcs_sigma,
                                       group_size=group_size, sampling=sampling, chat=chat,
                                       score_workers=score_workers, save_every=save_every or 1, backend=backend)
                summary = run_online(policy, prompts, out, make_reward(verifier, reward_weights, pattern=pattern,
                                                                       answer_column=answer_column), opts, online,
                                     on_iteration=on_step)
    if is_main():
        typer.echo(json.dumps({"checkpoint": str(out), **summary}))


def register(app: typer.Typer) -> None:
    app.command("train")(command)
