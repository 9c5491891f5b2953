"""Statistics of the search benchmark (pure numpy): bootstrap intervals, regret against budget, speed-up to a
target and its geometric mean across tables (``../shared/SEARCH.md`` section 5; rliable's percentile bootstrap).

Every interval is a 95 % percentile bootstrap interval over the repetitions (studies) of a method: resample the
repetitions with replacement ``n_boot`` times, compute the statistic on each resample, take the 2.5 % and 97.5 %
quantiles of those values (``inverted_cdf``: the smallest value whose share of resamples reaches the level, so
the interval's ends are values the statistic can take). ``exact=True`` enumerates all n^n resamples instead (for
small n; the unit test's hand-computed case).
"""

from __future__ import annotations

import math
import numpy as np

LEVEL = 0.95


def resample_index(n: int, n_boot: int, rng: np.random.Generator, exact: bool = False) -> np.ndarray:
    """``[n_boot, n]`` indices of bootstrap resamples (``exact``: all ``n**n`` ordered resamples)."""
    if exact:
        return np.arange(n**n, dtype=np.int64)[:, None] // n ** np.arange(n, dtype=np.int64) % n  # base-n digits
    return rng.integers(0, n, size=(n_boot, n))


def interval(replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval of bootstrap replicates (along axis 0)."""
    a = (1.0 - level) / 2
    lo, hi = np.quantile(replicates, [a, 1.0 - a], axis=0, method="inverted_cdf")
    return lo, hi


def median_ci(x, n_boot: int = 2000, seed: int = 0, exact: bool = False) -> tuple[float, float, float]:
    """(median, lower, upper): the sample median and the 95 % bootstrap interval of the median."""
    x = np.asarray(x, dtype=float)
    idx = resample_index(len(x), n_boot, np.random.default_rng(seed), exact)
    lo, hi = interval(np.median(x[idx], axis=1))
    return float(np.median(x)), float(lo), float(hi)


def mean_band(curves, n_boot: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column of ``curves`` ``[repetitions, grid]``: the mean and its 95 % bootstrap interval."""
    curves = np.asarray(curves, dtype=float)
    idx = resample_index(curves.shape[0], n_boot, np.random.default_rng(seed))
    means = curves[idx].mean(axis=1)  # (B, G)
    lo, hi = interval(means)
    return curves.mean(axis=0), lo, hi


def value_at(xs: np.ndarray, ys: np.ndarray, budget, before: float) -> np.ndarray:
    """The step function ``ys`` (changing at ``xs``, ascending) read at ``budget`` (scalar or array); ``before``
    where nothing was reported yet."""
    i = np.searchsorted(xs, budget, side="right") - 1
    return np.where(i >= 0, np.asarray(ys)[np.maximum(i, 0)] if len(ys) else before, before)


def first_reach(xs: np.ndarray, ys: np.ndarray, target: float) -> float:
    """The budget at which the step function first is at most ``target`` (inf: never)."""
    hit = np.flatnonzero(np.asarray(ys) <= target + 1e-9)
    return float(xs[hit[0]]) if len(hit) else math.inf


def speedup(t_base, t_method) -> float:
    """Median episodes of the baseline to the target over the method's (0 when the method's median never
    reaches it; inf when only the baseline's does not)."""
    b, m = float(np.median(t_base)), float(np.median(t_method))
    if math.isinf(m):
        return 0.0
    return b / m if m > 0 else math.inf


def _speedups(tb: np.ndarray, tm: np.ndarray, ib: np.ndarray, im: np.ndarray) -> np.ndarray:
    b = np.median(tb[ib], axis=1)
    m = np.median(tm[im], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.isinf(m), 0.0, b / m)


def speedup_ci(t_base, t_method, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(speed-up, lower, upper): :func:`speedup` and its 95 % bootstrap interval, the baseline's and the method's
    repetitions resampled independently (the target fixed)."""
    tb, tm = np.asarray(t_base, dtype=float), np.asarray(t_method, dtype=float)
    rng = np.random.default_rng(seed)
    s = _speedups(tb, tm, resample_index(len(tb), n_boot, rng), resample_index(len(tm), n_boot, rng))
    lo, hi = interval(s)
    return speedup(tb, tm), float(lo), float(hi)


def geomean(values) -> float:
    v = np.asarray(values, dtype=float)
    if (v <= 0).any():
        return 0.0
    return float(np.exp(np.log(v).mean()))


def geomean_ci(pairs: list[tuple[np.ndarray, np.ndarray]], n_boot: int = 2000,
               seed: int = 0) -> tuple[float, float, float]:
    """Across tables: the geometric mean of the per-table speed-ups (``pairs``: per table, the baseline's and the
    method's episodes to the target per repetition) and its 95 % interval (a stratified bootstrap: every table's
    repetitions resampled within the table; a table at 0 makes the mean 0)."""
    rng = np.random.default_rng(seed)
    reps = []
    for tb, tm in pairs:
        tb, tm = np.asarray(tb, dtype=float), np.asarray(tm, dtype=float)
        reps.append(_speedups(tb, tm, resample_index(len(tb), n_boot, rng), resample_index(len(tm), n_boot, rng)))
    lo, hi = _geomean_interval(reps, undefined=0.0)  # inf and 0 in one resample: a table the method never reaches
    return geomean([speedup(tb, tm) for tb, tm in pairs]), float(lo), float(hi)


def _geomean_interval(replicates: list[np.ndarray], undefined: float) -> tuple[float, float]:
    """The percentile interval of the geometric mean across tables of per-table bootstrap replicates (``undefined``
    where one resample holds both 0 and inf)."""
    with np.errstate(divide="ignore"):
        logs = [np.log(r) for r in replicates]
    with np.errstate(invalid="ignore"):
        g = np.exp(np.mean(logs, axis=0))
    return interval(np.nan_to_num(g, nan=undefined, posinf=np.inf))


def _ratios(ta: np.ndarray, tb: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """median(ta[idx]) / median(tb[idx]) per resample row: 0 where only B's median never reaches the target, inf
    where only A's never does, 1 where neither does."""
    a, b = np.median(ta[idx], axis=-1), np.median(tb[idx], axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(np.isinf(b), 0.0, a / b)
    return np.where(np.isinf(a) & np.isinf(b), 1.0, r)


def paired_ratio_ci(t_a, t_b, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Two variants' episodes to the same target on the same repetitions (study r of each with the same seed):
    (A's median over B's, lower, upper), B's speed-up over A with a *paired* 95 % bootstrap interval (the same
    repetitions resampled for both, so what the seeds share cancels)."""
    ta, tb = np.asarray(t_a, dtype=float), np.asarray(t_b, dtype=float)
    if ta.shape != tb.shape:
        raise ValueError(f"paired repetitions needed: {len(ta)} against {len(tb)}")
    idx = resample_index(len(ta), n_boot, np.random.default_rng(seed))
    lo, hi = interval(_ratios(ta, tb, idx))
    return float(_ratios(ta, tb, np.arange(len(ta)))), float(lo), float(hi)


def paired_geomean_ci(pairs: list[tuple[np.ndarray, np.ndarray]], n_boot: int = 2000,
                      seed: int = 0) -> tuple[float, float, float]:
    """Across tables: the geometric mean of :func:`paired_ratio_ci`'s ratios and its stratified paired 95 %
    interval (each table's repetitions resampled within the table, the same for both variants)."""
    rng = np.random.default_rng(seed)
    reps, point = [], []
    for ta, tb in pairs:
        ta, tb = np.asarray(ta, dtype=float), np.asarray(tb, dtype=float)
        reps.append(_ratios(ta, tb, resample_index(len(ta), n_boot, rng)))
        point.append(float(_ratios(ta, tb, np.arange(len(ta)))))
    lo, hi = _geomean_interval(reps, undefined=1.0)
    with np.errstate(divide="ignore"):
        return float(np.exp(np.mean(np.log(point)))), float(lo), float(hi)


def log_grid(lo: float, hi: float, n: int = 100) -> np.ndarray:
    return np.geomspace(lo, hi, n)


def finite_or_none(x: float, digits: int = 3):
    """For JSON: a rounded number, None for inf or nan."""
    return round(float(x), digits) if math.isfinite(x) else None

