"""Metric names, built in one place from the split that was evaluated.

An evaluation on split ``S`` (``val`` during training, ``test`` in selection and reports) is logged as
``S/loss``, ``S/acc`` (mean over instances), ``S/acc_2plus`` (mean over the 2nd..K-th instances: the search's
default objective), ``S/acc_K`` for the K-th instance of a class in an episode (``S/ci95_K``: its 95 %
half-width, where given) and, for a model with memory, ``S/read_entropy`` (how spread its reads are, 0..1:
``mann.memory.read_entropy``). Training-side names: ``episodes``, ``train/*``, ``time/*_s``, ``model/*``.
"""

from __future__ import annotations

from typing import Any, Mapping

EPISODES = "episodes"
# Result keys a logger keeps (the rest of a Tune result is Tune's own bookkeeping).
PREFIXES = ("val/", "train/", "time/", "model/", "test/")
SPLITS = ("val", "test", "train")


def name(split: str, what: str) -> str:
    """``name("val", "acc_2plus") == "val/acc_2plus"``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
    return f"{split}/{what}"


def instance(split: str, k: int) -> str:
    """Accuracy at the k-th instance (1-based)."""
    return name(split, f"acc_{k}")


def evaluation(split: str, by_instance: list[float], loss: float, ci95: list[float] | None = None) -> dict[str, float]:
    """The flat metrics of one evaluation on ``split``."""
    rest = by_instance[1:] or by_instance
    out = {name(split, "loss"): loss, name(split, "acc"): sum(by_instance) / len(by_instance),
           name(split, "acc_2plus"): sum(rest) / len(rest)}
    for k, a in enumerate(by_instance, 1):
        out[instance(split, k)] = a
    for k, c in enumerate(ci95 or [], 1):
        out[name(split, f"ci95_{k}")] = c
    return out


def by_instance(metrics: Mapping[str, Any], split: str) -> list[float]:
    """Accuracy by instance read back from flat metrics: ``S/acc_1``, ``S/acc_2``, ... while they last."""
    out, k = [], 1
    while instance(split, k) in metrics:
        out.append(float(metrics[instance(split, k)]))
        k += 1
    return out


def loggable(result: Mapping[str, Any]) -> dict[str, float]:
    """The numeric metrics of a result worth logging (our names, not a scheduler's bookkeeping)."""
    keep = {k: v for k, v in result.items() if k.startswith(PREFIXES) or k in (EPISODES, "diverged")}
    return {k: float(v) for k, v in keep.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
