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


# Below this config_share a table's spread is mostly seed noise: the benchmark and `curves signals` warn that it
# cannot tell methods apart (the recorded tables: 0.64-0.97; curves of noise around one level: 0.00-0.03).
NOISE_SHARE = 0.3


def noise_warning(share: float | None) -> str | None:
    """The warning of a table whose final values differ little between configurations beyond their seeds."""
    if share is None or share >= NOISE_SHARE:
        return None
    return (f"warning: only {share:.0%} of the spread of this table's final values lies between configurations, "
            f"the rest between seeds of one: it ranks luck more than methods, and its clicks are seed noise")


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

    def config_share(self) -> float | None:
        """The share of the variance of the curves' final values that lies between configurations rather than
        between seeds of one (a one-way random-effects estimate over the configurations with 2+ seeds; None
        without them): near 1, the configuration decides how a curve ends; near 0, the seed does, and a search
        on this table measures luck. 0.64-0.97 on the recorded tables (``paper5x10`` lowest)."""
        groups = [[f for f in (final_objective(c, self.sign) for c in cs) if f is not None] for cs in self.curves]
        groups = [g for g in groups if len(g) >= 2]
        if len(groups) < 3:
            return None
        within = float(np.mean([np.var(g, ddof=1) for g in groups]))
        n = float(np.mean([len(g) for g in groups]))
        between = max(float(np.var([np.mean(g) for g in groups], ddof=1)) - within / n, 0.0)
        return between / (between + within) if between + within > 0 else None

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
    """A recorded table (:func:`search.bench.curves.read_table`), checked against its own header: the objective,
    the budget and the space the curves claim; errors name the file, and the line of a curve."""
    return table_of(path, *read_table(path))


def table_of(path: str | Path, header: dict[str, Any], rows: list[dict[str, Any]]) -> Table:
    """:func:`load_table` of a table already read (its header and curves in the file's order)."""
    search = search_from_header(header)
    sign = _check_objective(path, header, search)
    _check_curves(path, header, search, rows)
    by_key: dict[str, list[dict[str, Any]]] = {}
    points: dict[str, dict[str, Any]] = {}
    for row in rows:
        key = json.dumps(row["point"], sort_keys=True)
        points.setdefault(key, row["point"])
        by_key.setdefault(key, []).append(row)
    keys = sorted(by_key, key=lambda k: min(r["config_id"] for r in by_key[k]))
    if len(keys) < 2:
        raise ConfigError(f"{path}: a benchmark needs curves of at least 2 configurations, the table has {len(keys)}")
    scored = {id(r): final_objective(r, sign) for k in keys for r in by_key[k]}
    known = [v for v in scored.values() if v is not None]
    if not known:
        raise ConfigError(f"{path}: no curve has a finite {header['objective']['metric']}: nothing to benchmark")
    worst = min(known)  # a curve without a finite value counts as the table's worst
    finals = []
    value = []
    for k in keys:
        f = [worst if scored[id(r)] is None else scored[id(r)] for r in by_key[k]]
        finals.extend(f)
        value.append(float(np.mean(f)))
    if max(value) - min(value) <= 0:
        raise ConfigError(f"{path}: every configuration ends at the same {header['objective']['metric']} "
                          f"({sign * value[0]:g}): there is nothing for a search to find")
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


def final_objective(row: dict[str, Any], sign: float = 1.0) -> float | None:
    """A curve's final objective times ``sign`` (larger = better); a diverged curve, or one with a non-finite
    value, counts as the worst value it reached; None when it has no finite value at all."""
    vals = [sign * float(v) for v in row["objective"] if finite(v)]
    if not vals:
        return None
    if row.get("diverged") or len(vals) < len(row["objective"]):
        return min(vals)
    return vals[-1]


def _check_objective(path, header: dict[str, Any], search: LoadedSearch) -> float:
    """The header's objective is the recorded search's primary one; its sign (1 for max, -1 for min)."""
    head = header.get("objective")
    primary = search.config.primary
    if not isinstance(head, dict) or head.get("mode") not in ("max", "min"):
        raise ConfigError(f"{path}: the header's objective must be {{\"metric\": ..., \"mode\": \"max\" or \"min\"}}, "
                          f"got {head!r}")
    if head.get("metric") != primary.metric or head["mode"] != primary.mode:
        raise ConfigError(f"{path}: the header's objective ({head.get('metric')}, {head['mode']}) is not its "
                          f"search's primary objective ({primary.metric}, {primary.mode}); the two must agree")
    return 1.0 if head["mode"] == "max" else -1.0


def _check_curves(path, header: dict[str, Any], search: LoadedSearch, rows: list[dict[str, Any]]) -> None:
    """Every curve within the recorded budget, ending at it unless it diverged, at a point of the space."""
    budget = search.max_episodes
    if header.get("max_episodes") not in (None, budget):
        raise ConfigError(f"{path}: the header's max_episodes ({header['max_episodes']}) is not its search's "
                          f"training budget ({budget} episodes)")
    space = search.config.space
    for line, row in enumerate(rows, 2):
        where = f"{path}:{line} (configuration {row['config_id']}, seed {row['seed']})"
        last = row["episodes"][-1]
        if last > budget:
            raise ConfigError(f"{where}: evaluated at {last:g} episodes, past the search's budget of {budget}")
        if last < budget and not row.get("diverged"):
            raise ConfigError(f"{where}: ends at {last:g} episodes, before the budget of {budget}, and is not "
                              f"marked diverged (a cut recording?)")
        for key, v in row["point"].items():
            spec = space.get(key)
            if spec is None:
                raise ConfigError(f"{where}: point sets {key}, which is not in the search's space "
                                  f"({', '.join(space)})")
            if v is None:
                continue  # an inactive conditional parameter
            if spec.type == "categorical":
                if v not in spec.choices:
                    raise ConfigError(f"{where}: point's {key} = {v!r} is not one of its choices {spec.choices}")
            elif not (isinstance(v, (int, float)) and float(spec.low) - 1e-9 <= float(v) <= float(spec.high) + 1e-9):
                raise ConfigError(f"{where}: point's {key} = {v!r} is outside its range [{spec.low}, {spec.high}]")


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
