"""Matplotlib figures for MLflow: learning curves, accuracy by instance, search history, parallel coordinates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

from mann import metrics

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _instances(history: list[dict[str, float]], split: str) -> list[int]:
    return list(range(1, max((len(metrics.by_instance(row, split)) for row in history), default=0) + 1))


def _save_accuracy_plot(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def learning_curve(history: list[dict[str, float]], path: Path, title: str = "", split: str = "val") -> None:
    """Accuracy on ``split`` at selected instance numbers over training episodes."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ks = _instances(history, split)
    for k in [k for k in (1, 2, 3, 5, 10) if k in ks] or ks:
        name = metrics.instance(split, k)
        pts = [(r[metrics.EPISODES], r[name]) for r in history if name in r and metrics.EPISODES in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=f"instance {k}")
    _save_accuracy_plot(fig, ax, path, "training episodes", f"{split} accuracy", title or "learning curve")


def accuracy_by_instance(rows: dict[str, list[float]], path: Path, title: str = "") -> None:
    """One line per model: accuracy at the 1st..K-th instance (the paper's figure style)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, acc in rows.items():
        ax.plot(range(1, len(acc) + 1), acc, marker="o", label=label)
    _save_accuracy_plot(fig, ax, path, "instance", "accuracy", title or "accuracy by instance")


def search_history(values: list[float], mode: str, path: Path, metric: str) -> None:
    """Objective of each trial (its last evaluation: an early-ended trial's value where it ended) in the order
    the trials ended, with the best so far."""
    fig, ax = plt.subplots(figsize=(6, 4))
    best, cur = [], None
    for v in values:
        cur = v if cur is None else (max(cur, v) if mode == "max" else min(cur, v))
        best.append(cur)
    ax.scatter(range(1, len(values) + 1), values, s=14, label="trial")
    ax.plot(range(1, len(values) + 1), best, color="C1", label="best so far")
    ax.set_xlabel("trials in the order they ended")
    ax.set_ylabel(f"{metric} (last evaluation)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parallel_coordinates(points: list[dict[str, Any]], values: list[float], path: Path, metric: str) -> None:
    """Each trial a line across its (normalised) parameters, coloured by the objective."""
    keys = sorted({k for p in points for k in p})
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(keys)), 4))
    cols = []
    for k in keys:
        raw = [p.get(k) for p in points]
        nums = [v for v in raw if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(nums) == len([v for v in raw if v is not None]) and nums:
            lo, hi = min(nums), max(nums)
            cols.append([(v - lo) / (hi - lo) if hi > lo and v is not None else 0.5 for v in raw])
        else:  # categorical: evenly spaced levels
            levels = sorted({repr(v) for v in raw})
            cols.append([levels.index(repr(v)) / max(len(levels) - 1, 1) for v in raw])
    lo, hi = (min(values), max(values)) if values else (0, 1)
    cmap = plt.get_cmap("viridis")
    for i, v in enumerate(values):
        ax.plot(range(len(keys)), [c[i] for c in cols], color=cmap((v - lo) / (hi - lo) if hi > lo else 0.5),
                alpha=0.8)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([k.split(".")[-1] for k in keys], rotation=20, fontsize=8)
    ax.set_yticks([])
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(lo, hi))
    fig.colorbar(sm, ax=ax, label=metric)
    ax.set_title("every trial: parameters (normalised), colour = objective", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
