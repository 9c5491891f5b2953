"""The mann-search service: Optuna-guided Ray Tune search over MANN hyperparameters with MLflow lineage.

The only package that imports Ray and MLflow; ``mann`` stays free of both.
"""

from __future__ import annotations

import os as _os
import sys as _sys

# Ray reads its authentication mode once, when it is first imported: token authentication is on unless the
# user explicitly turned it off (a Ray dashboard or Jobs API reachable by others runs their code).
# Imported after Ray with the variable unset, the default comes too late for this process: connect_ray refuses
# then (with a message) rather than start a cluster its own driver cannot authenticate to.
RAY_IMPORTED_FIRST = "ray" in _sys.modules and "RAY_AUTH_MODE" not in _os.environ
_os.environ.setdefault("RAY_AUTH_MODE", "token")

from .config import LoadedSearch, SearchConfig, load_search_config
from .model_format import load_model
from .study import SearchError, Study

__all__ = ["LoadedSearch", "SearchConfig", "SearchError", "Study", "load_model", "load_search_config"]
