"""How many trials a sampler needs to draw its first configuration at the benchmark's target, on a recorded
curves table: random sampling and scrambled Sobol points (``sampler.startup: qmc``'s start) against TPE told each
trial's click time or its final value the moment it is drawn (full information, one trial at a time, no
scheduler). An instrument over recorded curves, not a method: it reads the table's truth. It asks whether a
model-based sampler could find the few good configurations sooner than at random if the scheduler gave it what it
knows (docs/freeze-thaw.md, "What TPE sees of a paused trial"), and what an even start buys.

    .venv/bin/python scripts/sampler_first_good.py results/curves/quickstart.jsonl --target 1.068 --repeats 100

``--target``: regret in points (the benchmark's target: the baseline's median final regret, in the benchmark's
JSON as ``target_regret``). Prints, per sampler, the median and mean trials to the first good configuration and
the share of repetitions that needed more than 40. With ``--baseline-episodes E`` (the baseline's median episodes
to the target, the benchmark's JSON: ``methods["tpe+asha (ray optuna)"]["episodes_to_target"]``) also the oracle
screen of ``search.bench.bound`` over random and Sobol draws (not uniform ones), as a speed-up bound: what a search
that samples so and judges every curve perfectly at its click could reach (docs/freeze-thaw.md, "Where 2x
stands").
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import optuna

from search import DefineByRun
from search.bench.bound import click_episodes, good_configurations
from search.bench.table import load_table
from search.space import sobol_sampler


def draws(table, told: str, seed: int, n_startup: int, limit: int = 200):
    """(configuration, curve) of each trial the sampler draws, in order, at most ``limit`` (TPE is told each
    trial's click time or final value right after it is drawn)."""
    clicks = click_episodes(table) if told == "click" else None
    sampler = (optuna.samplers.RandomSampler(seed=seed) if told == "random" else sobol_sampler(seed) if told == "qmc"
               else optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup))
    study = optuna.create_study(direction="minimize", sampler=sampler)
    define = DefineByRun(table.search)
    for _ in range(limit):
        trial = study.ask()
        define(trial)
        cfg, curve = table.curve_of(trial.params, seed)
        yield cfg, curve
        value = (clicks[cfg][curve] / table.search.max_episodes if told == "click" else  # lower = sooner = better
                 -float(table.value[cfg]) if told == "final" else 0.0)
        study.tell(trial, value)


def trials_to_first_good(table, target: float, told: str, seed: int, n_startup: int, limit: int = 200) -> int:
    """Trials until the sampler draws a configuration at or under ``target`` (``limit`` if never)."""
    good = good_configurations(table, target)
    for k, (cfg, _) in enumerate(draws(table, told, seed, n_startup, limit)):
        if good[cfg]:
            return k + 1
    return limit


def screen_episodes(table, target: float, drawn: list[tuple[int, int]], deadline: float) -> float:
    """The oracle screen (search.bench.bound) over these draws instead of uniform ones: every curve is watched
    until its click or the deadline, and the first curve of a configuration at or under ``target`` that clicks by
    the deadline ends it; its episodes (inf: none among the draws)."""
    return _screened(good_configurations(table, target), click_episodes(table), drawn, deadline)


def _screened(good, clicks, drawn: list[tuple[int, int]], deadline: float) -> float:
    total = 0.0
    for cfg, curve in drawn:
        c = clicks[cfg][curve]
        if good[cfg] and c <= deadline:
            return total + c
        total += min(c, deadline)
    return math.inf


def screen_bounds(table, target: float, baseline_episodes: float, repeats: int, limit: int = 300) -> dict[str, dict]:
    """Per sampler (random, Sobol): the oracle screen's speed-up bound (``baseline_episodes`` over its median
    episodes) with the deadline at the latest click of a good curve, and with the best of 20 deadlines (5 %-100 %
    of a run, chosen knowing the table: a hindsight reference)."""
    good, clicks = good_configurations(table, target), click_episodes(table)
    max_t = float(table.search.max_episodes)
    latest = max(c for i, cs in enumerate(clicks) if good[i] for c in cs)
    out = {}
    for told in ("random", "qmc"):
        seqs = [list(draws(table, told, r, 0, limit)) for r in range(repeats)]
        by = {d: float(np.median([_screened(good, clicks, s, d) for s in seqs]))
              for d in sorted({latest, *(max_t * np.linspace(0.05, 1.0, 20))})}
        best = min(by, key=by.get)
        out[told] = {"latest": (latest / max_t, baseline_episodes / by[latest]),
                     "best": (best / max_t, baseline_episodes / by[best])}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("table")
    ap.add_argument("--target", type=float, required=True, help="regret in points (the benchmark's target)")
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--n-startup", type=int, default=10, help="TPE's random trials before it models")
    ap.add_argument("--baseline-episodes", type=float,
                    help="the baseline's median episodes to the target (the benchmark's JSON: the baseline's "
                         "episodes_to_target): also print the oracle screen's speed-up bound with this sampler's draws")
    args = ap.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    table = load_table(args.table)
    print(f"{args.table}: {int(good_configurations(table, args.target).sum())} of {len(table.points)} "
          f"configurations at or under {args.target} points")
    for told in ("random", "qmc", "click", "final"):
        n = np.array([trials_to_first_good(table, args.target, told, r, args.n_startup) for r in range(args.repeats)])
        name = {"random": "random", "qmc": "Sobol (qmc)"}.get(told, f"TPE told the {told}")
        print(f"  {name:22s} trials to the first good configuration: median {np.median(n):.1f}, mean "
              f"{n.mean():.1f}, over 40 in {100 * np.mean(n > 40):.0f} %")
    if args.baseline_episodes:
        for told, b in screen_bounds(table, args.target, args.baseline_episodes, args.repeats).items():
            name = {"random": "random", "qmc": "Sobol (qmc)"}[told]
            print(f"  {name:22s} oracle screen, speed-up bound: {b['latest'][1]:.2f} (deadline the latest good click, "
                  f"{b['latest'][0]:.2f} of a run), {b['best'][1]:.2f} (best deadline in hindsight, {b['best'][0]:.2f})")


if __name__ == "__main__":
    main()
