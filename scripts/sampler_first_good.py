"""How many trials a sampler needs to draw its first configuration at the benchmark's target, on a recorded
curves table: random sampling and scrambled Sobol points (``sampler.startup: qmc``'s start) against TPE told each
trial's click time or its final value the moment it is drawn (full information, one trial at a time, no
scheduler). An instrument over recorded curves, not a method: it reads the table's truth. It asks whether a
model-based sampler could find the few good configurations sooner than at random if the scheduler gave it what it
knows (docs/freeze-thaw.md, "What TPE sees of a paused trial"), and what an even start buys.

    .venv/bin/python scripts/sampler_first_good.py results/curves/quickstart.jsonl --target 1.068 --repeats 100

``--target``: regret in points (the benchmark's target: the baseline's median final regret, in the benchmark's
JSON as ``target_regret``). Prints, per sampler, the median and mean trials to the first good configuration and
the share of repetitions that needed more than 40.
"""

from __future__ import annotations

import argparse

import numpy as np
import optuna

from search import DefineByRun
from search.bench.bound import click_episodes, good_configurations
from search.bench.table import load_table
from search.space import sobol_sampler


def trials_to_first_good(table, target: float, told: str, seed: int, n_startup: int, limit: int = 200) -> int:
    """Trials until the sampler draws a configuration at or under ``target`` (``limit`` if never)."""
    good, clicks = good_configurations(table, target), click_episodes(table)
    sampler = (optuna.samplers.RandomSampler(seed=seed) if told == "random" else sobol_sampler(seed) if told == "qmc"
               else optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup))
    study = optuna.create_study(direction="minimize", sampler=sampler)
    define = DefineByRun(table.search)
    for k in range(limit):
        trial = study.ask()
        define(trial)
        cfg, curve = table.curve_of(trial.params, seed)
        if good[cfg]:
            return k + 1
        value = {"click": clicks[cfg][curve] / table.search.max_episodes,  # lower = sooner = better
                 "final": -float(table.value[cfg])}.get(told, 0.0)
        study.tell(trial, value)
    return limit


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("table")
    ap.add_argument("--target", type=float, required=True, help="regret in points (the benchmark's target)")
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--n-startup", type=int, default=10, help="TPE's random trials before it models")
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


if __name__ == "__main__":
    main()
