"""How well a curve's early signals predict its end (``mann-search curves signals``): the measurement behind
"ranking trials early by accuracy misleads" and behind any scheduler that would rank on something else.

An instrument over a recorded curves table (real learning curves, ``mann-search curves record``), not a test
double. For each curve and each budget fraction f (10 % and 25 % by default) it reads every signal at the last
evaluation at or before f of the table's budget, and the objective at the curve's end. Per signal and fraction:

* **rank correlation** (Spearman, ties ranked by their mean) of the signal with the final objective, with a 95 %
  bootstrap interval over the curves;
* **AUROC for "will click"**: the chance that a curve that clicks has a higher signal than one that does not
  (ties count half). A curve *clicks* as in the plateau rule (``search.schedulers.PlateauRule``): its final value
  reaches ``click_fraction`` (0.25) of the way from the plateau (the median over curves of the median of their
  values in the scheduler's plateau span, ``search.schedulers.plateau_span``: 10-30 % of the budget; the first
  three recorded evaluations until 2026-12-07) to the best final value of the table.

Besides, the table's **shape** (``shape``): per curve the episodes to its click (its first evaluation at or above
the click level; the full budget if it never gets there), as fractions of the budget: the median over curves (the
*median curve's plateau share*, what a search without stopping waits through), its quartiles, and the share of
curves that never click; among the curves that click, the rank correlation of the click time with the final
value (negative: the earlier a curve clicks, the higher it ends); the final objective by configuration (mean over
its seeds): best, top quartile, median, worst; and the recording's cost (seconds in training steps and in all,
summed over the curves, and the median curve's).

Signals, each oriented so that higher should mean better: ``objective`` (the search's objective), ``acc_1`` (the
accuracy at the 1st instance: what the controller learns without the memory), ``neg_val_loss``,
``neg_train_loss`` and ``neg_read_entropy`` (the memory's reads sharpening; recorded since 2026-12-06, absent from
older tables). A signal a table does not have is left out. A table whose objective is minimised (its header's
``objective.mode`` is ``min``, e.g. a loss) has its objective negated throughout (``objective_negated`` in the
report), so larger is better here as in the benchmark.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from mann.config import ConfigError
from search import plateau_span

from .curves import read_table
from .stats import interval, resample_index
from .table import finite, noise_warning, table_of

FRACTIONS = (0.1, 0.25)
CLICK_FRACTION = 0.25  # as search.config.PlateauConfig.click_fraction


def _neg(x):
    return None if x is None else -float(x)


SIGNALS: dict[str, Callable[[dict[str, Any], int], float | None]] = {
    "objective": lambda c, i: c["objective"][i],
    "acc_1": lambda c, i: c["acc_by_instance"][i][0] if c.get("acc_by_instance") else None,
    "neg_val_loss": lambda c, i: _neg(c["val_loss"][i]) if c.get("val_loss") else None,
    "neg_train_loss": lambda c, i: _neg(c["train_loss"][i]) if c.get("train_loss") else None,
    "neg_read_entropy": lambda c, i: _neg(c["read_entropy"][i]) if c.get("read_entropy") else None,
}


def ranks(x) -> np.ndarray:
    """1-based ranks of a 1-D array, tied values given their mean rank."""
    x = np.asarray(x, dtype=float)
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(1, len(x) + 1)
    _, inv = np.unique(x, return_inverse=True)
    return (np.bincount(inv, r) / np.bincount(inv))[inv]


def spearman(x, y) -> float:
    """Spearman's rank correlation (NaN if either side is constant)."""
    rx, ry = ranks(np.asarray(x, dtype=float)), ranks(np.asarray(y, dtype=float))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / den) if den > 0 else math.nan


def auroc(scores, positive) -> float:
    """P(score of a positive > score of a negative), ties half (Mann-Whitney U / n_pos n_neg); NaN without both."""
    s, p = np.asarray(scores, dtype=float), np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(p.sum()), int((~p).sum())
    if not n_pos or not n_neg:
        return math.nan
    r = ranks(s)
    return float((r[p].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _at(curve: dict[str, Any], budget: float) -> int | None:
    """Index of the last evaluation at or before ``budget`` episodes (None: none yet)."""
    eps = curve["episodes"]
    idx = [i for i, e in enumerate(eps) if e <= budget + 1e-9]
    return idx[-1] if idx else None


def curve_plateau(curve: dict[str, Any], budget: float, sign: float = 1.0) -> float:
    """The median of a recorded curve's finite values in the plateau span (``search.schedulers.plateau_span``,
    the stretch the schedulers take a study's plateau from), times ``sign``; -inf if it has none."""
    points = [(float(e), sign * float(v)) for e, v in zip(curve["episodes"], curve["objective"])
              if v is not None and math.isfinite(float(v))]
    span = plateau_span(points, budget)
    return float(np.median(span)) if span else -math.inf


def click_labels(finals: np.ndarray, firsts: np.ndarray,
                 click_fraction: float = CLICK_FRACTION) -> tuple[np.ndarray, float]:
    """(clicked per curve, the click level) from the final values and each curve's plateau
    (:func:`curve_plateau`)."""
    plateau = float(np.median(firsts))
    level = plateau + click_fraction * (float(np.max(finals)) - plateau)
    return finals >= level, level


def signal_power(curves: list[dict[str, Any]], budget: float, fractions=FRACTIONS, n_boot: int = 2000,
                 seed: int = 0) -> dict[str, Any]:
    """The report of the module doc for one table's curves (``budget``: the table's full episodes)."""
    usable = [c for c in curves if not c.get("diverged") and c["objective"] and finite(c["objective"][-1])
              and c["episodes"][-1] >= budget - 1e-9]
    if len(usable) < 2:
        raise ConfigError(f"{len(usable)} of {len(curves)} curves ran the full {budget:g} episodes to a finite "
                          f"objective: too few to measure signals on")
    finals = np.array([float(c["objective"][-1]) for c in usable])
    firsts = np.array([curve_plateau(c, budget) for c in usable])
    clicked, level = click_labels(finals, firsts)
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"curves": len(curves), "used": len(usable), "budget": budget,
                           "click_level": _r(level, 4), "clicked": int(clicked.sum()),
                           "shape": shape(usable, budget, level, curves), "signals": {}}
    for name, read in SIGNALS.items():
        per: dict[str, Any] = {}
        for f in fractions:
            vals, keep = [], []
            for k, c in enumerate(usable):
                i = _at(c, f * budget)
                v = read(c, i) if i is not None else None
                if v is not None and math.isfinite(float(v)):
                    vals.append(float(v))
                    keep.append(k)
            if len(keep) < 3:
                continue
            v, fin, clk = np.array(vals), finals[keep], clicked[keep]
            idx = resample_index(len(v), n_boot, rng)
            boots = np.array([spearman(v[j], fin[j]) for j in idx])
            lo, hi = interval(boots[np.isfinite(boots)]) if np.isfinite(boots).any() else (math.nan, math.nan)
            per[f"{f:g}"] = {"n": len(keep), "spearman": _r(spearman(v, fin)), "ci95": [_r(lo), _r(hi)],
                             "auroc_click": _r(auroc(v, clk))}
        if per:
            out["signals"][name] = per
    return out


def click_fraction_of(curve: dict[str, Any], budget: float, level: float) -> float | None:
    """Episodes to the curve's first evaluation at or above ``level``, as a fraction of ``budget`` (None: never)."""
    for e, v in zip(curve["episodes"], curve["objective"]):
        if v is not None and math.isfinite(float(v)) and float(v) >= level:
            return min(1.0, float(e) / budget)
    return None


def shape(curves: list[dict[str, Any]], budget: float, level: float,
          recorded: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The table's shape (module doc): click times as fractions of the budget and the finals by configuration of
    the usable ``curves``; the cost of all ``recorded`` ones (default: ``curves``)."""
    if not curves:
        return {}
    clicks = [click_fraction_of(c, budget, level) for c in curves]
    at = np.array([1.0 if x is None else x for x in clicks])  # a curve that never clicks waits the whole budget
    ever = np.array([x is not None for x in clicks])
    by_config: dict[Any, list[float]] = {}
    for c in curves:
        by_config.setdefault(c.get("config_id", id(c)), []).append(float(c["objective"][-1]))
    finals = np.array([np.mean(v) for v in by_config.values()])
    recorded = curves if recorded is None else recorded
    train = [float(c["train_s"][-1]) for c in recorded if c.get("train_s")]  # cumulative: the last is the total
    wall = [float(c["wall_s"]) for c in recorded if c.get("wall_s") is not None]
    cost = {"train_s": _r(sum(train)), "wall_s": _r(sum(wall)),
            "median_curve_wall_s": _r(np.median(wall)) if wall else None}
    rho = spearman(at[ever], [float(c["objective"][-1]) for c, k in zip(curves, ever) if k]) \
        if ever.sum() >= 3 else math.nan
    return {"click_at_median": _r(np.median(at)),
            "click_at_quartiles": [_r(np.quantile(at, 0.25)), _r(np.quantile(at, 0.75))],
            "never_click": _r(1.0 - ever.mean()), "click_time_vs_final": _r(rho), "cost": cost, "configs": len(finals),
            "final_by_config": {"best": _r(finals.max()), "top_quartile": _r(np.quantile(finals, 0.75)),
                                "median": _r(np.median(finals)), "worst": _r(finals.min())}}


def shape_line(sh: dict[str, Any]) -> str:
    """The shape in one sentence (both reports)."""
    f = sh["final_by_config"]
    return (f"median curve clicks at {sh['click_at_median']:.0%} of the budget (quartiles "
            f"{sh['click_at_quartiles'][0]:.0%}-{sh['click_at_quartiles'][1]:.0%}), {sh['never_click']:.0%} never; "
            f"among the curves that click, Spearman of click time with final {_fmt(sh['click_time_vs_final'])}; "
            f"final by configuration ({sh['configs']}): best {f['best'] * 100:.1f} %, top quartile from "
            f"{f['top_quartile'] * 100:.1f} %, median {f['median'] * 100:.1f} %, worst {f['worst'] * 100:.1f} %")


def _r(x: float, digits: int = 3):
    return None if x is None or not math.isfinite(float(x)) else round(float(x), digits)


def table_signals(paths: list[str], fractions=FRACTIONS, n_boot: int = 2000) -> dict[str, Any]:
    """``{table name: signal_power(...)}`` for tables written by ``mann-search curves record``."""
    out = {}
    for path in paths:
        header, curves = read_table(path)  # in the file's order (the bootstrap's resamples follow it)
        table = table_of(path, header, curves)  # the benchmark's checks: objective, budget and space as its header says
        budget = float(table.search.max_episodes)
        negated = table.sign < 0
        if negated:  # a "min" objective (a loss): negated, so that larger is better here as everywhere
            curves = [{**c, "objective": [None if v is None else -float(v) for v in c["objective"]]} for c in curves]
        try:
            report = signal_power(curves, budget, fractions, n_boot)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        share = table.config_share()
        out[table.header.get("name", str(path))] = {**report, "objective_negated": negated,
                                                    "config_share": None if share is None else round(share, 3)}
    return out


def format_report(report: dict[str, Any]) -> str:
    lines = []
    for name, t in report.items():
        lines.append(f"{name}: {t['used']} of {t['curves']} curves ran the full {t['budget']:g} episodes; "
                     f"{t['clicked']} clicked (final >= {_level(t['click_level'])})"
                     + ("; a 'min' objective, negated throughout" if t.get("objective_negated") else ""))
        warning = noise_warning(t.get("config_share"))
        if warning:
            lines.append(f"  {warning}")
        sh = t.get("shape")
        if sh:
            lines.append(f"  shape: {shape_line(sh)}")
            c = sh["cost"]
            if c.get("median_curve_wall_s") is not None:
                lines.append(f"  cost: {c['wall_s'] / 3600:.2f} h of recording in all ({c['train_s'] / 3600:.2f} h in "
                             f"training steps), {c['median_curve_wall_s']:.0f} s the median curve")
        fr = sorted({f for s in t["signals"].values() for f in s}, key=float)
        lines.append(f"  {'signal':18s}" + "".join(f"  {'at ' + format(float(f), '.0%') + ': spearman':>16s} {'[95% CI]':14s}  auroc"
                                                   for f in fr))
        for sig, per in t["signals"].items():
            row = f"  {sig:18s}"
            for f in fr:
                p = per.get(f)
                if p is None:
                    row += " " * 43
                    continue
                lo, hi = p["ci95"]
                auc = "  n/a" if p["auroc_click"] is None else f"{p['auroc_click']:.2f}"
                row += f"  {_fmt(p['spearman']):>16s} [{_fmt(lo)}, {_fmt(hi)}]  {auc:>5s}"
            lines.append(row)
    return "\n".join(lines)


def _level(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _fmt(x) -> str:
    return "  n/a" if x is None else f"{x:+.2f}"


def markdown_report(report: dict[str, Any]) -> str:
    """:func:`table_signals`'s report as Markdown (README's tables are pasted from this)."""
    lines = []
    for name, t in report.items():
        fr = sorted({f for sig in t["signals"].values() for f in sig}, key=float)
        sh = t.get("shape") or {}
        lines.append(f"**{name}** ({t['used']} curves of {t['budget']:g} episodes; {t['clicked']} click"
                     + ("; a 'min' objective, negated throughout" if t.get("objective_negated") else "") + ")")
        if sh:
            lines.append(shape_line(sh))
        warning = noise_warning(t.get("config_share"))
        if warning:
            lines += ["", warning + "."]
        lines += ["", "| signal (higher = better) | " + " | ".join(f"at {float(f):.0%}: Spearman [95 % CI] | AUROC"
                                                                  for f in fr) + " |",
                  "| --- |" + " ---: | ---: |" * len(fr)]
        for sig, per in t["signals"].items():
            cells = []
            for f in fr:
                p = per.get(f)
                if p is None:
                    cells += ["", ""]
                    continue
                lo, hi = p["ci95"]
                cells += [f"{_fmt(p['spearman'])} [{_fmt(lo)}, {_fmt(hi)}]",
                          "n/a" if p["auroc_click"] is None else f"{p['auroc_click']:.2f}"]
            lines.append(f"| {sig} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
