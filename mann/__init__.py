"""Memory-Augmented Neural Networks (Santoro et al. 2016): LRUA memory, Omniglot episodes, training.

This package never imports Ray or MLflow; the search service in ``search`` wraps it.
"""

from __future__ import annotations

from .config import ConfigError, ModelConfig, TrainConfig, load_train_config
from .model import MANN, MANNState, build_model
from .train import Callback, EvalReport, EvalResult, TrainingDiverged, evaluate, train

__all__ = [
    "MANN", "MANNState", "Callback", "ConfigError", "EvalReport", "EvalResult", "ModelConfig", "TrainConfig",
    "TrainingDiverged", "build_model", "evaluate", "load_train_config", "train",
]
