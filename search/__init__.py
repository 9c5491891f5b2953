"""The mann-search service: Optuna-guided Ray Tune search over MANN hyperparameters with MLflow lineage.

The only package that imports Ray and MLflow; ``mann`` stays free of both.

The public surface is ``__all__`` below: what a user, a test or an instrument (``search.bench``: curves
tables, the replay benchmark) may import. Everything else is private to the service, whatever its spelling.
Names that need Ray (the runner, searcher, schedulers) load on first use, so ``import search`` stays light.
"""

from __future__ import annotations

import importlib as _importlib
import os as _os
import sys as _sys

# Ray reads its authentication mode once, when it is first imported: token authentication is on unless the
# user explicitly turned it off (a Ray dashboard or Jobs API reachable by others runs their code).
# Imported after Ray with the variable unset, the default comes too late for this process: connect_ray refuses
# then (with a message) rather than start a cluster its own driver cannot authenticate to.
RAY_IMPORTED_FIRST = "ray" in _sys.modules and "RAY_AUTH_MODE" not in _os.environ
_os.environ.setdefault("RAY_AUTH_MODE", "token")

from .config import LoadedSearch, SchedulerConfig, SearchConfig, load_search_config
from .protocol import (TRIAL_NUMBER_KEY, BudgetWatch, Ending, StudyFacts, TrialOutcome, TrialReport, decide,
                       outcome_counts, sampled_point, selectable, trial_label, trial_name, label_of)
from .study import SearchError, Study, git_commit

# name -> module that defines it (loaded on first access: these import Ray, Optuna or MLflow)
_LAZY = {
    "run": "runner", "resume": "runner", "status": "runner", "build_tuner": "runner", "restore_tuner": "runner",
    "make_searcher": "runner", "make_scheduler": "runner", "StudyOutcome": "runner", "EpisodeBudget": "runner",
    "StudySearch": "searcher", "OptunaStudy": "searcher", "warm_start": "searcher", "storage_url": "searcher", "open_study": "searcher",
    "trial_outcomes": "searcher",
    "suggest": "space", "make_sampler": "space", "DefineByRun": "space",
    "PlateauRule": "schedulers", "PlateauStopping": "schedulers", "StudyEvidence": "schedulers",
    "FreezeThawRule": "schedulers", "FreezeThaw": "schedulers", "SlotLimiter": "schedulers",
    "plateau_span": "schedulers",
    "CONTINUE": "schedulers", "STOP": "schedulers",
    "connect_ray": "ray_cluster",
    "load_model": "model_format",
}

__all__ = [
    # configuration and the study
    "LoadedSearch", "SearchConfig", "SchedulerConfig", "load_search_config", "Study", "SearchError", "git_commit",
    # the trial protocol
    "TrialReport", "TrialOutcome", "Ending", "StudyFacts", "BudgetWatch", "decide", "outcome_counts",
    "selectable", "trial_label", "trial_name", "label_of", "sampled_point", "TRIAL_NUMBER_KEY",
    # the service (lazy)
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(_importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'search' has no attribute {name!r}")
