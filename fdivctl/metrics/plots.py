"""Headless PNG plots (matplotlib, Agg backend): one panel per domain ("all" first).

Each writes PNG whatever the path's suffix, so callers can hand it a temporary name.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _panels(groups: list[str]):
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    return fig, axes[0]


def passk_curves(metrics: dict, ks: list[int], path: Path) -> None:
    """pass@k against k (log scale) for every run, per domain."""
    groups = _groups(metrics)
    fig, axes = _panels(groups)
    for ax, group in zip(axes, groups):
        for run, figures in metrics.items():
            values = _group(figures, group)
            if values is None:
                continue
            ax.plot(ks, [values[f"pass@{k}"] for k in ks], marker="o", label=run)
            if f"pass@{ks[0]}_ci95" in values:
                lo = [values[f"pass@{k}_ci95"][0] for k in ks]
                hi = [values[f"pass@{k}_ci95"][1] for k in ks]
                ax.fill_between(ks, lo, hi, alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k")
        ax.set_ylim(0, 1)
        ax.set_title(group)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def reward_kl(runs: dict[str, dict], base: str | None, best_of_n: list[tuple[float, float]] | None,
              path: Path) -> None:
    """Mean reward against KL to the --kl-model (nats per sequence, ± one standard error) for every run, and the
    best-of-N frontier of ``base`` at the KL bound log N − (N − 1)/N (metrics/best_of_n.py)."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if best_of_n:
        xs, ys = zip(*best_of_n)
        ax.plot(xs, ys, color="grey", marker="s", linestyle="--", label=f"best-of-N of {base}")
    for run, figures in runs.items():
        ax.errorbar([figures["kl"]], [figures["mean_reward"]], xerr=[figures.get("kl_stderr") or 0.0], marker="o",
                    capsize=3, label=run)
    ax.set_xscale("symlog", linthresh=0.1)  # runs near the model and far from it on one axis; estimates may be < 0
    ax.set_xlabel("KL(run ‖ kl-model), nats per sequence")
    ax.set_ylabel("mean reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def solve_rate_scatter(run: str, base: str, pairs: dict[str, list[tuple[float, float]]], path: Path) -> None:
    """Per-prompt solve rate (c/n) of ``run`` against ``base``, per domain."""
    groups = list(pairs)
    fig, axes = _panels(groups)
    for ax, group in zip(axes, groups):
        xs, ys = zip(*pairs[group]) if pairs[group] else ((), ())
        ax.scatter(xs, ys, s=12, alpha=0.6)
        ax.plot([0, 1], [0, 1], color="grey", linewidth=1)
        ax.set_xlabel(f"{base} solve rate")
        ax.set_ylabel(f"{run} solve rate")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(group)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def distinct_correct_histogram(counts: dict[str, dict[str, list[int]]], path: Path) -> None:
    """Histogram of distinct correct answers per prompt, one series per run, per domain."""
    groups = sorted({g for per_run in counts.values() for g in per_run}, key=lambda g: (g != "all", g))
    fig, axes = _panels(groups)
    for ax, group in zip(axes, groups):
        top = max((max(v) for per_run in counts.values() for v in [per_run.get(group, [0])] if v), default=0)
        bins = [b - 0.5 for b in range(top + 2)]
        for run, per_run in counts.items():
            if group in per_run:
                ax.hist(per_run[group], bins=bins, alpha=0.5, label=run)
        ax.set_xlabel("distinct correct answers per prompt")
        ax.set_ylabel("prompts")
        ax.set_title(group)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def _groups(metrics: dict) -> list[str]:
    domains = sorted({d for figures in metrics.values() for d in figures.get("domains", {})})
    return ["all", *domains]


def _group(figures: dict, group: str) -> dict | None:
    return figures["all"] if group == "all" else figures.get("domains", {}).get(group)
