"""A table of recorded learning curves as the benchmark reads it (:class:`Table`, :func:`load_table`): each
configuration's curves, its value (the mean over seeds of the final objective) and its normalised coordinates,
the nearest-configuration mapping of a sampled point, and what a replayed evaluation reports
(:func:`recorded_values`). Both engines of ``mann-search benchmark`` (:mod:`search.bench.replay`, the Tune engine,
and :mod:`search.bench.sim`, the simulated one) and the instruments (:mod:`search.bench.bound`) read tables
through this module; the format is :mod:`search.bench.curves`'."""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mann.config import ConfigError
from search import LoadedSearch, sampled_point

from .curves import read_table


@dataclass
class Table:
    header: dict[str, Any]
    search: LoadedSearch
    points: list[dict[str, Any]]  # one per recorded configuration
    curves: list[list[dict[str, Any]]]  # per configuration, its usable seeds' curves
    value: np.ndarray  # per configuration: mean over seeds of the final objective (larger = better)
    vectors: np.ndarray  # per configuration: its normalised coordinates
    top_quartile: float  # of the curves' final objectives
    sign: float = 1.0  # -1 for a "min" objective: every value here is larger = better

    @property
    def best(self) -> float:
        return float(self.value.max())

    @property
    def n_curves(self) -> int:
        return sum(len(c) for c in self.curves)

    def curve_of(self, config: dict[str, Any], salt: int) -> tuple[int, int]:
        """(configuration, seed) a trial with this Tune config replays in repetition ``salt``."""
        point = sampled_point(config)
        idx = self.nearest(point)
        return idx, pick_seed(len(self.curves[idx]), point, salt)

    def nearest(self, point: dict[str, Any]) -> int:
        d = ((self.vectors - coordinates(self.search, point)) ** 2).sum(axis=1)
        return int(np.argmin(d))

    def mapping_loo(self) -> float:
        """Correlation of each configuration's value with its nearest other configuration's."""
        if len(self.points) < 3:
            return float("nan")
        d = ((self.vectors[:, None, :] - self.vectors[None, :, :]) ** 2).sum(axis=2)
        np.fill_diagonal(d, np.inf)
        return float(np.corrcoef(self.value, self.value[d.argmin(axis=1)])[0, 1])


def finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def search_from_header(header: dict[str, Any], overrides: dict[str, Any] | None = None) -> LoadedSearch:
    """The table's search (config and base MANN tree, both in its header), with search-config overrides."""
    return LoadedSearch.from_trees(header["search"], header["base"], overrides)


def coordinates(search: LoadedSearch, point: dict[str, Any]) -> np.ndarray:
    out: list[float] = []
    for path, spec in search.config.space.items():
        v = point.get(path)
        if spec.type == "categorical":
            out.extend(math.sqrt(0.5) * float(v == c) for c in spec.choices)
            out.append(math.sqrt(0.5) * float(v is None and path not in point))
            continue
        if v is None:
            out.extend([0.0, 1.0])  # inactive: 1 away from any active value
            continue
        lo, hi, x = float(spec.low), float(spec.high), float(v)
        if spec.log:
            lo, hi, x = math.log(lo), math.log(hi), math.log(x)
        out.extend([(x - lo) / (hi - lo) if hi > lo else 0.0, 0.0])
    return np.array(out)


def load_table(path: str | Path) -> Table:
    header, rows = read_table(path)
    search = search_from_header(header)
    sign = 1.0 if header["objective"]["mode"] == "max" else -1.0
    by_key: dict[str, list[dict[str, Any]]] = {}
    points: dict[str, dict[str, Any]] = {}
    for row in rows:
        key = json.dumps(row["point"], sort_keys=True)
        points.setdefault(key, row["point"])
        by_key.setdefault(key, []).append(row)
    keys = sorted(by_key, key=lambda k: min(r["config_id"] for r in by_key[k]))
    if len(keys) < 2:
        raise ConfigError(f"{path}: a benchmark needs curves of at least 2 configurations, the table has {len(keys)}")
    finals = []
    value = []
    for k in keys:
        f = [sign * final_objective(r) for r in by_key[k]]
        finals.extend(f)
        value.append(float(np.mean(f)))
    return Table(header, search, [points[k] for k in keys], [by_key[k] for k in keys], np.array(value),
                 np.stack([coordinates(search, points[k]) for k in keys]), float(np.quantile(finals, 0.75)), sign)


def with_shape(table: Table, num_samples: int | None = None, max_concurrent: int | None = None) -> Table:
    """The table with another study shape for the baseline (``budget.num_samples``, ``budget.max_concurrent`` of
    its recorded search; ``None``: as recorded): how a method does with a cluster's many concurrent trials."""
    budget = {k: v for k, v in (("num_samples", num_samples), ("max_concurrent", max_concurrent)) if v is not None}
    if not budget:
        return table
    header = copy.deepcopy(table.header)
    header["search"].setdefault("budget", {}).update(budget)
    return replace(table, header=header, search=search_from_header(header))


def final_objective(row: dict[str, Any]) -> float:
    """A curve's final objective; a diverged or cut curve counts as the worst value it reached (or chance 0)."""
    vals = [v for v in row["objective"] if finite(v)]
    if row.get("diverged") or not vals or len(vals) < len(row["objective"]):
        return min(vals) if vals else 0.0
    return float(vals[-1])


def pick_seed(n: int, point: dict[str, Any], salt: int) -> int:
    h = hashlib.sha256(f"{salt}:{json.dumps(point, sort_keys=True)}".encode()).digest()
    return int.from_bytes(h[:4], "little") % n


# The recorded columns a replayed evaluation reports beside the objective, under the names the trainable uses.
RECORDED_SIGNALS = {"train_loss": "train/loss", "val_loss": "val/loss"}


def recorded_values(curve: dict[str, Any], i: int, metric: str) -> dict[str, float]:
    """What evaluation ``i`` of a recorded curve reports, as the trainable reported it: the objective under
    ``metric`` and the losses the table recorded (a scheduler may read them; missing or non-finite ones left
    out)."""
    out = {}
    for column, name in RECORDED_SIGNALS.items():
        col = curve.get(column) or []
        v = col[i] if i < len(col) else None
        if finite(v):
            out[name] = float(v)
    out[metric] = float(curve["objective"][i])
    return out
