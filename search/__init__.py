"""The mann-search service: Optuna-guided Ray Tune search over MANN hyperparameters with MLflow lineage.

The only package that imports Ray and MLflow; ``mann`` stays free of both.
"""

from __future__ import annotations

import os as _os

# Ray reads its authentication mode once, when it is first imported: token authentication is on unless the
# user explicitly turned it off (a Ray dashboard or Jobs API reachable by others runs their code).
_os.environ.setdefault("RAY_AUTH_MODE", "token")

from .config import LoadedSearch, SearchConfig, load_search_config

__all__ = ["LoadedSearch", "SearchConfig", "load_search_config"]
