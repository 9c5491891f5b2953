"""YAML space -> Optuna define-by-run sampling, with conditional parameters and constraints between them."""

from __future__ import annotations

import math
import warnings
from typing import Any

import optuna

from mann.config import ConfigError

from .config import LoadedSearch, ParamSpec, base_value, compare


def _condition_holds(when: dict[str, Any] | None, values: dict[str, Any], base: dict[str, Any]) -> bool:
    for path, want in (when or {}).items():
        have = values[path] if path in values else base_value(base, path)
        allowed = want if isinstance(want, list) else [want]
        if have not in allowed:
            return False
    return True


def _bound(op: str, v: float, is_int: bool) -> tuple[str, float]:
    """``x op v`` as ("high" | "low", bound) on x's range."""
    if op == "<=":
        return "high", math.floor(v) if is_int else v
    if op == "<":
        return "high", math.ceil(v) - 1 if is_int else math.nextafter(v, -math.inf)
    if op == ">=":
        return "low", math.ceil(v) if is_int else v
    return "low", math.floor(v) + 1 if is_int else math.nextafter(v, math.inf)


def _bounds(path: str, spec: ParamSpec, loaded: LoadedSearch, values: dict[str, Any]) -> tuple[float, float]:
    """Narrow ``[low, high]`` by every constraint whose other side is known: sampled earlier, or fixed."""
    low, high = float(spec.low), float(spec.high)
    order = list(loaded.config.space)
    later = set(order[order.index(path) + 1 :])
    for c in loaded.constraints:
        for mine, other, op in ((c.left, c.right, c.op), (c.right, c.left, _flip(c.op))):
            if mine != path or other in later:
                continue  # not about this parameter, or decided when the other one is sampled
            if isinstance(other, str):
                if other in loaded.config.space and other not in values:
                    continue  # the other one is inactive (a condition switched it off)
                v = values[other] if other in values else base_value(loaded.base_tree, other)
            else:
                v = other
            side, bound = _bound(op, float(v), spec.type == "int")
            if side == "high":
                high = min(high, bound)
            else:
                low = max(low, bound)
    if low > high:
        raise ConfigError(f"space.{path}: the constraints leave no value in [{spec.low}, {spec.high}] given {values}")
    return low, high


def _flip(op: str) -> str:
    return {"<=": ">=", "<": ">", ">=": "<=", ">": "<"}[op]


def suggest(trial: optuna.Trial, loaded: LoadedSearch) -> dict[str, Any]:
    """Sample one point: ``{dotted path: value}`` for every active parameter, in the space's order."""
    space = loaded.config.space
    values: dict[str, Any] = {}
    for path, spec in space.items():
        if not _condition_holds(spec.when, values, loaded.base_tree):
            continue
        if spec.type == "categorical":
            values[path] = trial.suggest_categorical(path, spec.choices)
            continue
        low, high = _bounds(path, spec, loaded, values)
        if spec.type == "int":
            step = int(spec.step or 1)
            low_i = int(low)
            high_i = low_i + (int(high) - low_i) // step * step  # Optuna wants high on the step grid
            values[path] = trial.suggest_int(path, low_i, high_i, step=step, log=spec.log)
        else:
            if spec.step is not None:
                high = low + math.floor((high - low) / spec.step + 1e-9) * spec.step
            values[path] = trial.suggest_float(path, low, high, step=spec.step, log=spec.log)
    _check_constraints(values, loaded)
    return values


def _check_constraints(values: dict[str, Any], loaded: LoadedSearch) -> None:
    for i, c in enumerate(loaded.constraints):
        sides = []
        for side in (c.left, c.right):
            sides.append(values.get(side, None) if isinstance(side, str) else side)
            if isinstance(side, str) and side not in values:
                sides[-1] = base_value(loaded.base_tree, side)
        if not compare(sides[0], c.op, sides[1]):
            raise ConfigError(f"constraints[{i}]: sampled values break it ({sides[0]} {c.op} {sides[1]})")


class DefineByRun:
    """What OptunaSearch calls per trial (Optuna records the params on the trial). A picklable object, not a
    closure: Tune saves the searcher, and this with it, so that a resumed study keeps what it learned."""

    def __init__(self, loaded: LoadedSearch):
        self.loaded = loaded

    def __call__(self, trial: optuna.Trial) -> None:
        suggest(trial, self.loaded)
        return None


def sobol_sampler(seed: int, **kwargs: Any) -> optuna.samplers.QMCSampler:
    """Scrambled Sobol points: unscrambled, every seed gives the same points, from the space's lower corner."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # stable in use since Optuna 3
        return optuna.samplers.QMCSampler(seed=seed, scramble=True, **kwargs)


class SobolStart(optuna.samplers.BaseSampler):
    """A model-based sampler (TPE, CMA-ES) whose first ``n_startup`` trials are a scrambled Sobol sequence
    (``sampler.startup: qmc``) instead of its own independent random draws: a low-discrepancy start covers the
    space evenly, so a small region of good configurations is hit after fewer trials, and rarely after many
    (docs/freeze-thaw.md, "An even start"). A trial is drawn by the start while fewer than ``n_startup`` trials are finished
    (COMPLETE or PRUNED: what TPE and CMA-ES count), by the model after; the choice is made once per trial."""

    FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)

    def __init__(self, model: optuna.samplers.BaseSampler, n_startup: int, seed: int):
        self.model, self.n_startup = model, n_startup
        self.start = sobol_sampler(seed, warn_independent_sampling=False)
        self._by_trial: dict[int, optuna.samplers.BaseSampler] = {}

    def _for(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> optuna.samplers.BaseSampler:
        chosen = self._by_trial.get(trial._trial_id)
        if chosen is None:
            done = len(study._get_trials(deepcopy=False, states=self.FINISHED, use_cache=True))
            chosen = self._by_trial[trial._trial_id] = self.start if done < self.n_startup else self.model
        return chosen

    def infer_relative_search_space(self, study, trial):
        return self._for(study, trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._for(study, trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._for(study, trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self._for(study, trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self._by_trial.pop(trial._trial_id, self.model).after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.model.reseed_rng()
        self.start.reseed_rng()


def make_sampler(loaded: LoadedSearch) -> optuna.samplers.BaseSampler:
    s = loaded.config.sampler
    if s.kind in ("tpe", "cmaes"):
        model = (optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.n_startup_trials,
                                            constant_liar=s.constant_liar) if s.kind == "tpe" else
                 optuna.samplers.CmaEsSampler(seed=s.seed, n_startup_trials=s.n_startup_trials))
        return SobolStart(model, s.n_startup_trials, s.seed) if s.start == "qmc" else model
    if s.kind == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    if s.kind == "qmc":
        return sobol_sampler(s.seed)
    return optuna.samplers.NSGAIISampler(seed=s.seed)
