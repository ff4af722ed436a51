"""``fdivctl distill``: offline (logit store) or online (teacher model) distillation."""

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
from fdivctl.stages.distill import DistillOptions, OnPolicyOptions, run_distill
from fdivctl.training.distributed import is_main
from fdivctl.training.loop import LoopOptions
from fdivctl.training.lora import LoraOptions


def command(
    student: Path = typer.Argument(..., help="Student model directory (save_pretrained format)."),
    out: Path = typer.Argument(..., help="Checkpoint directory to write (HF format + fdivctl_state/)."),
    data: Path = typer.Option(None, help="Offline: sequences Parquet (rollouts, prompt/completion text, plain "
                              "text: every token, or messages: one sequence per assistant reply) to distill on, "
                              "teacher-forced."),
    on_policy: bool = typer.Option(False, help="On-policy (OPD): the student samples each micro-batch's --prompts "
                                   "with its current weights and the --teacher scores those samples."),
    prompts: Path = typer.Option(None, help="On-policy: prompts Parquet (prompt_id + prompt text or messages)."),
    on_policy_fraction: float = typer.Option(None, help="GKD's λ (TRL's lmbda): with --on-policy and --data SEQS "
                                             "instead of --prompts, each micro-batch is the student's samples after "
                                             "its rows' prompt tokens with probability λ, else the rows' own "
                                             "completions; logged as on_policy_share. Needs --teacher."),
    samples_per_prompt: int = typer.Option(4, help="On-policy: samples of each prompt per micro-batch."),
    max_new_tokens: int = typer.Option(128, help="On-policy: longest sample, in tokens."),
    baseline: str = typer.Option("none", help="--loss opd: none, or vopd (detached per-token −KL(q‖p) baseline: "
                                 "same expected gradient, lower variance)."),
    baseline_topk: int = typer.Option(None, help="vopd: the baseline's KL over the teacher's top-K ids + tail "
                                      "instead of the full vocabulary."),
    backend: str = typer.Option("hf", help="On-policy sampling: hf, vllm, or auto (vllm on CUDA when installed)."),
    chat: bool = typer.Option(False, help="Wrap text prompts in the tokenizer's chat template, as rollout --chat "
                              "does: on-policy prompts, and the prompts of text prompt/completion tables (--data, "
                              "--eval-data; a --logits store must be made with teacher-logits --chat)."),
    max_length: int = typer.Option(None, help="Cut each sequence (--data, --eval-data) to this many tokens, prompt + "
                                   "completion, keeping its start (TRL's max_length): the completion is cut, and a "
                                   "row whose prompt alone fills it is dropped; the summary counts both. A --logits "
                                   "store must be made with the same teacher-logits --max-length. Default: refuse a "
                                   "sequence longer than the models' context."),
    logits: Path = typer.Option(None, help="Offline teacher signal: a store from `fdivctl teacher-logits`."),
    teacher: list[Path] = typer.Option(None, "--teacher", help="Online teacher signal: a teacher model directory "
                                       "(run under no_grad); repeat for a per-token mixture of teachers."),
    teacher_weights: str = typer.Option(None, help="Several teachers: fixed weights (0.7,0.3) or confidence "
                                        "(per token, each teacher's top-token probability; MAD-OPD). Default "
                                        "confidence."),
    loss: str = typer.Option(None, help="A registry divergence (fkl, rkl, jsd, tv, hellinger, alpha, skl, srkl; "
                             "params as jsd:beta=0.3); pld (Plackett-Luce list-wise); sinkhorn (SinKD, batch-wise "
                             "OT; sinkhorn:batch=256,support_k=64); bdkd (forward/reverse KL balanced by the "
                             "entropy gap; bdkd:mu=2); ce (plain SFT); sft-DIVERGENCE (f-divergence SFT with the "
                             "teacher as the reference, e.g. sft-hellinger; = train --algo sft --divergence); opd "
                             "(on-policy: sampled-token reward log p − log q as a policy gradient). Default: fkl "
                             "offline, opd on-policy."),
    beta: float = typer.Option(None, help="Shorthand for --loss jsd:beta=BETA."),
    schedule: str = typer.Option(None, help="Divergences by share of steps, e.g. fkl:0.5,rkl:0.5 (PACED's two "
                                 "stages); replaces --loss; shares must sum to 1."),
    sinkhorn_eps: float = typer.Option(None, help="--loss sinkhorn: entropic regularization ε (default 0.1)."),
    sinkhorn_iters: int = typer.Option(None, help="--loss sinkhorn: Sinkhorn iterations (default 20)."),
    prompt_weighting: str = typer.Option("none", help="none, or paced: weight each prompt by p^α(1−p)^β of the "
                                         "student's pass rate p (PACED), from a pass_rate column or --pass-rates."),
    paced_alpha: float = typer.Option(1.0, help="PACED: α of the Beta kernel."),
    paced_beta: float = typer.Option(1.0, help="PACED: β of the Beta kernel."),
    pass_rates: Path = typer.Option(None, help="PACED: a scored table (fdivctl score output: prompt_id, "
                                    "pass_rate) giving each prompt's pass rate."),
    depth_curriculum: bool = typer.Option(False, help="TCOD: expose turns of multi-turn data gradually; a turn_ids "
                                          "column gives each completion token's 0-based turn, else each assistant "
                                          "header of the student's chat template starts the next turn."),
    depth_start: int = typer.Option(1, help="TCOD: turns exposed at step 0."),
    depth_warmup: int = typer.Option(100, help="TCOD: steps until every turn is exposed (linear growth)."),
    temperature: float = typer.Option(1.0, help="Distillation temperature (student and teacher divided by it)."),
    mix_ce: float = typer.Option(0.0, help="Weight of the ground-truth cross-entropy added to the divergence."),
    chunk_size: int = CHUNK_SIZE,
    tail: str = typer.Option("tail", help="Top-k store form: tail (k+1 buckets), renormalize, or ignore."),
    vocab: str = typer.Option("strict", help="Online teacher with another vocabulary size: strict, truncate, pad."),
    lr: float = typer.Option(1e-4, help="Peak learning rate (AdamW)."),
    lr_schedule: str = typer.Option("cosine", help="constant, linear or cosine decay after warm-up."),
    warmup: int = typer.Option(0, help="Linear warm-up steps."),
    batch_size: int = typer.Option(8, help="Sequences per micro-batch."),
    grad_accum: int = typer.Option(1, help="Micro-batches per optimizer step; the step's loss is the mean over all "
                                   "their tokens, as one micro-batch of them would give."),
    max_steps: int = typer.Option(None, help="Optimizer steps (default: --epochs over the data)."),
    epochs: int = typer.Option(1, help="Passes over the data when --max-steps is not given."),
    seed: int = typer.Option(0, help="Seed of the data order."),
    max_grad_norm: float = MAX_GRAD_NORM,
    save_every: int = typer.Option(0, help="Checkpoint every N steps (0: only at the end)."),
    eval_data: Path = typer.Option(None, help="Held-out sequences Parquet: its loss is logged as eval_loss."),
    eval_logits: Path = typer.Option(None, help="The teacher-logits store of --eval-data (when training uses "
                                     "--logits)."),
    eval_every: int = typer.Option(0, help="Evaluate on --eval-data every N steps and after the last (0: never)."),
    trust_region: float = typer.Option(None, help="ERPD stage 2: distill a token only where the teacher's log-prob "
                                       "of it is within ε of the base's (the initial student, a frozen copy); "
                                       "the share kept is logged as trust_region_kept."),
    grad_checkpointing: bool = GRAD_CHECKPOINTING,
    group_by_length: bool = GROUP_BY_LENGTH,
    dist_backend: str = DIST_BACKEND,
    lora_r: int = LORA_R,
    lora_alpha: float = LORA_ALPHA,
    lora_dropout: float = LORA_DROPOUT,
    log_jsonl: Path = typer.Option(None, help="Append one JSON line per step: loss, divergence, ce, grad norm, lr, "
                                   "tokens/s."),
    tensorboard: Path = TENSORBOARD,
    resume: bool = typer.Option(False, help="Continue from the checkpoint in OUT (exact: data order, optimizer, RNG)."),
    dtype: str = TRAIN_DTYPE,
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    allow_tokenizer_mismatch: bool = typer.Option(False, help="UNSAFE: skip the student/teacher tokenizer check."),
    allow_prompt_mismatch: bool = typer.Option(False, help="Distil from a --logits/--eval-logits store whose teacher "
                                               "was given other prompts than the data's (context distillation: "
                                               "the teacher saw hints or a system prompt the student does not)."),
) -> None:
    """Distill a teacher into a student with any divergence, through the chunked loss engine."""
    if beta is not None:
        loss = f"jsd:beta={beta}"
    if sinkhorn_eps is not None or sinkhorn_iters is not None:
        if loss is None or not loss.startswith("sinkhorn"):
            raise UserError("--sinkhorn-eps/--sinkhorn-iters set --loss sinkhorn's parameters: add --loss sinkhorn")
        extra = [f"eps={sinkhorn_eps}"] * (sinkhorn_eps is not None) + [f"iters={sinkhorn_iters}"] * (
            sinkhorn_iters is not None)
        loss = loss + ("," if ":" in loss else ":") + ",".join(extra)
    if on_policy_fraction is not None:
        if not on_policy or data is None or prompts is not None:
            raise UserError("--on-policy-fraction mixes samples with a sequences table's completions: give it with "
                            "--on-policy and --data SEQS.parquet (not --prompts)")
    elif on_policy != (prompts is not None) or (data is None) == (prompts is None):
        raise UserError("give --data SEQS.parquet (offline), or --on-policy with --prompts PROMPTS.parquet")
    loop = LoopOptions(lr=lr, lr_schedule=lr_schedule, warmup=warmup, batch_size=batch_size, grad_accum=grad_accum,
                       max_steps=max_steps, epochs=epochs, seed=seed, max_grad_norm=max_grad_norm,
                       save_every=save_every, log_jsonl=log_jsonl, tensorboard=tensorboard, resume=resume,
                       grad_checkpointing=grad_checkpointing, group_by_length=group_by_length,
                       dist_backend=dist_backend, eval_every=eval_every,
                       lora=LoraOptions(r=lora_r, alpha=lora_alpha, dropout=lora_dropout))
    loop.check()  # before any file is read
    online = OnPolicyOptions(samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens, baseline=baseline,
                             baseline_topk=baseline_topk, backend=backend, chat=chat) if on_policy else None
    opts = DistillOptions(loss=loss, schedule=schedule, temperature=temperature, mix_ce=mix_ce, chunk_size=chunk_size,
                          tail=tail, vocab=vocab, dtype=dtype, device=device,
                          allow_tokenizer_mismatch=allow_tokenizer_mismatch,
                          allow_prompt_mismatch=allow_prompt_mismatch, teacher_weights=teacher_weights,
                          on_policy=online, on_policy_fraction=on_policy_fraction, chat=chat, max_length=max_length,
                          prompt_weighting=prompt_weighting,
                          paced_alpha=paced_alpha,
                          paced_beta=paced_beta, pass_rates=pass_rates, depth_curriculum=depth_curriculum,
                          depth_start=depth_start, depth_warmup=depth_warmup, eval_data=eval_data,
                          eval_logits=eval_logits, trust_region=trust_region, loop=loop)
    with progress_bar("distill", "steps") as progress:
        task = progress.add_task("distill", total=None)

        def on_step(step, total, figures):
            progress.update(task, completed=step, total=total,
                            description=f"distill loss {figures.get('loss', float('nan')):.4f}")

        summary = run_distill(student, out, data or prompts, opts, logits=logits, teacher=teacher or None, on_step=on_step)
    if is_main():
        typer.echo(json.dumps({"checkpoint": str(out), **summary}))


def register(app: typer.Typer) -> None:
    app.command("distill")(command)
