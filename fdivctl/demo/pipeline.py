"""The quickstart pipeline: the ``fdivctl`` command lines, the data it starts from, and its report.

:func:`steps` is the one list of command lines: ``fdivctl demo run`` executes
them in-process (printing each first), ``fdivctl demo script`` prints them as
the shell script ``examples/quickstart.sh``.  The run is seeded end to end.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pyarrow as pa

from fdivctl.demo import task
from fdivctl.io.tables import write_table

VERIFIER = "python:fdivctl.demo.task:verify"
#: budgets of the full run and of ``--quick`` (CI)
BUDGETS = {
    "full": dict(sft_per_prompt=64, sft_epochs=14, rl_iterations=30, eval_n=16, ks="1,2,4,8,16", distill_epochs=4),
    "quick": dict(sft_per_prompt=16, sft_epochs=3, rl_iterations=3, eval_n=4, ks="1,2,4", distill_epochs=1),
}
POLICIES = ("sft", "grpo", "grpo-rkl", "dph-jsd")
EVALUATED = ("random", *POLICIES)
STUDENTS = ("student-fkl", "student-rkl", "student-jsd")
MAX_NEW_TOKENS = "12"


def steps(out: str, quick: bool) -> list[tuple[str, list[str]]]:
    """(what the step does, the fdivctl arguments) in order; ``out`` is the output directory as written."""
    b = BUDGETS["quick" if quick else "full"]
    data = f"{out}/data"
    sample = ["--max-new-tokens", MAX_NEW_TOKENS]
    rl = ["--prompts", f"{data}/prompts.parquet", "--verifier", VERIFIER, "--iterations", str(b["rl_iterations"]),
          "--prompts-per-iteration", "8", "--group-size", "8", "--ppo-epochs", "2", "--minibatch-size", "16",
          "--lr", "1e-4", *sample]
    run = [
        ("the task: in-domain training prompts, in/out-of-domain eval prompts, diverse SFT demonstrations",
         ["demo", "data", data, "--sft-per-prompt", str(b["sft_per_prompt"])]),
        ("a random-init Qwen2 (hidden 256, 4 layers) on the task's character tokenizer",
         ["demo", "init", f"{data}/tokenizer", f"{out}/random", "--hidden", "256", "--layers", "4"]),
        ("the initial policy: SFT on the demonstrations",
         ["train", f"{out}/random", f"{out}/sft", "--algo", "sft", "--data", f"{data}/sft.parquet", "--lr", "1e-3",
          "--lr-schedule", "cosine", "--batch-size", "32", "--epochs", str(b["sft_epochs"])]),
        ("DPH-RL pre-sampling: 8+1 samples per prompt from the initial policy; D_pef / D_exp split",
         ["train", f"{out}/sft", f"{out}/dph-partition", "--algo", "dph", "--partition", "--prompts",
          f"{data}/prompts.parquet", "--verifier", VERIFIER, "--k", "8", "--pef-threshold", "0.875", *sample]),
        ("RL 1: GRPO without a KL term",
         ["train", f"{out}/sft", f"{out}/grpo", "--algo", "grpo", *rl, "--log-jsonl", f"{out}/grpo.jsonl"]),
        ("RL 2: GRPO + reverse KL to the initial policy (k3 estimator, in the loss)",
         ["train", f"{out}/sft", f"{out}/grpo-rkl", "--algo", "grpo", *rl, "--divergence", "rkl", "--div-coef",
          "0.1", "--div-estimator", "k3", "--log-jsonl", f"{out}/grpo-rkl.jsonl"]),
        ("RL 3: DPH-RL with Jensen-Shannon on the stored reference samples (no reference model)",
         ["train", f"{out}/sft", f"{out}/dph-jsd", "--algo", "dph", "--partition-dir", f"{out}/dph-partition",
          *rl, "--divergence", "jsd", "--eta", "0.2", "--log-jsonl", f"{out}/dph-jsd.jsonl"]),
        ("the teacher's top-k distributions over the demonstrations, cached once for every student",
         ["teacher-logits", f"{out}/sft", f"{data}/sft.parquet", f"{out}/teacher-logits", "--k", "16"]),
        ("a smaller random-init student (hidden 128, 4 layers)",
         ["demo", "init", f"{data}/tokenizer", f"{out}/student", "--hidden", "128", "--layers", "4", "--seed", "1"]),
    ]
    for name in STUDENTS:
        loss = name.split("-")[1]
        run.append((f"distill the initial policy into the student with {loss} from the one store",
                    ["distill", f"{out}/student", f"{out}/{name}", "--data", f"{data}/sft.parquet", "--logits",
                     f"{out}/teacher-logits", "--loss",
                     loss, "--lr", "2e-3", "--batch-size", "32", "--epochs", str(b["distill_epochs"])]))
    for name in (*EVALUATED, *STUDENTS):
        run.append((f"sample {name} on the eval prompts ({b['eval_n']} per prompt)",
                    ["rollout", f"{out}/{name}", f"{data}/eval_prompts.parquet", f"{out}/samples/{name}.parquet",
                     "--n", str(b["eval_n"]), "--seed", "1234", *sample]))
        run.append((f"score {name}", ["score", f"{out}/samples/{name}.parquet",
                                      f"{out}/samples/{name}.scored.parquet", "--verifier", VERIFIER]))
    runs = [arg for name in (*EVALUATED, *STUDENTS) for arg in ("--run", f"{name}={out}/samples/{name}.scored.parquet")]
    run.append(("pass@k, distinct correct answers and forgetting, in and out of domain, against the initial policy; "
                 "each run's KL to it and the reward-KL plot",
                ["eval", out, *runs, "--base", "sft", "--domain-column", "domain", "--answers", "text", "--k",
                 b["ks"], "--kl-model", f"{out}/sft"]))
    run.append(("REPORT.md: the measured table", ["demo", "report", out]))
    return run


def script(quick: bool) -> str:
    """The shell script of :func:`steps` (``examples/quickstart.sh``)."""
    lines = [
        "#!/usr/bin/env bash",
        "# fdivctl quickstart: what the divergence choice does to pass@k, on a CPU in minutes.",
        "# Generated by `fdivctl demo script" + (" --quick" if quick else "") + "`; `fdivctl demo run OUT` runs "
        "the same commands.",
        "set -euo pipefail",
        'OUT="${1:-quickstart-out}"',
        "",
    ]
    for what, args in steps("$OUT", quick):
        lines += [f"# {what}", "fdivctl " + " ".join(map(_shell_word, args)), ""]
    return "\n".join(lines)


def _shell_word(arg: str) -> str:
    """``arg`` quoted for the shell with every ``$OUT`` in it expanded: the rest quoted, ``"$OUT"`` between."""
    return '"$OUT"'.join(shlex.quote(part) if part else "" for part in arg.split("$OUT"))


def write_data(directory: Path, sft_per_prompt: int, seed: int) -> dict:
    """prompts.parquet (in-domain, for training), eval_prompts.parquet (all), sft.parquet, tokenizer/."""
    from fdivctl import tiny

    directory.mkdir(parents=True, exist_ok=True)
    rows = task.prompts()
    train = [r for r in rows if r["domain"] == "in"]
    texts = [r["prompt"] + " " + a for r in rows for a in task.solutions(r["terms"], r["target"])[:3]]
    tokenizer = tiny.train_tokenizer(directory / "tokenizer", vocab_size=None, texts=texts)
    record = {"task": "digitsum", "seed": seed}
    write_table(directory / "prompts.parquet", pa.Table.from_pylist(train), record)
    write_table(directory / "eval_prompts.parquet", pa.Table.from_pylist(rows), record)
    sft = task.sft_rows(train, sft_per_prompt, tokenizer.eos_token, seed)
    write_table(directory / "sft.parquet", pa.Table.from_pylist(sft), record)
    return {"train_prompts": len(train), "eval_prompts": len(rows), "sft_rows": len(sft)}


def write_report(out: Path) -> Path:
    """REPORT.md from ``out/metrics.json`` (written by ``fdivctl eval``)."""
    metrics = json.loads((out / "metrics.json").read_text())
    ks = metrics["k"]
    header = ["run", "domain", *[f"pass@{k}" for k in ks], "distinct correct", f"forgetting@{ks[-1]}",
              "KL to sft"]
    lines = [
        "# fdivctl quickstart report",
        "",
        "Task `digitsum` (write a target as a sum of 2 or 3 digits; many correct answers per prompt). "
        "`in` = the training prompts, `out` = held-out targets. Each model sampled "
        f"{metrics['runs']['sft']['all']['samples'] // max(1, metrics['runs']['sft']['all']['prompts'])} times "
        "per prompt at temperature 1; pass@k is the unbiased estimator; distinct correct = mean number of "
        "different correct answers per prompt; forgetting = share of the prompts the initial policy (`sft`) solves "
        "at the largest k that the run no longer solves; KL to sft = KL(run ‖ sft) in nats per sequence, estimated "
        "from the run's samples (`reward_kl.png` plots it against the mean reward, beside sft's "
        "best-of-N).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for run, figures in metrics["runs"].items():
        for domain, values in sorted(figures.get("domains", {}).items()):
            cells = [run, domain, *[f"{values[f'pass@{k}']:.3f}" for k in ks], f"{values['distinct_correct']:.2f}"]
            forgetting = values.get(f"forgetting@{ks[-1]}")
            cells.append("–" if forgetting is None or run == "sft" else f"{forgetting:.3f}")
            cells.append(f"{round(values['kl'], 2) + 0.0:.2f}" if "kl" in values else "–")  # + 0.0: no "-0.00"
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Plots: `passk.png`, `distinct_correct.png`, `reward_kl.png`. Numbers: `metrics.json`.", ""]
    path = out / "REPORT.md"
    path.write_text("\n".join(lines))
    return path
