"""The logged MANN model, loadable without unpickling: an MLflow pyfunc whose loader is this module.

A trial's model is logged as MLflow's ``python_function`` flavor with ``loader_module: search.model_format`` and
one data file, ``data/model.pt``: the MANN config and state dict (a mann checkpoint without the optimizer), read
with ``weights_only=True`` by :func:`mann.train.load_checkpoint`. Loading it imports this installed module and runs
nothing from the artifact store: ``mlflow.pyfunc.load_model("models:/mann@champion")`` gives a model whose
``predict(inputs)`` returns the logits, and :func:`load_model` the ``torch.nn.Module`` itself.

Models logged by mann-search before this format (``mlflow.pytorch`` with ``serialization_format="pickle"``) still
load through :func:`load_model`, with one warning saying they are pickles.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("mann_search.model_format")

LOADER_MODULE = "search.model_format"
DATA_FILE = "model.pt"
PIP_REQUIREMENTS = ["torch", "mann-search"]


def log_model(checkpoint: Path, name: str = "model"):
    """Log a trial's checkpoint as the model of the active MLflow run; returns MLflow's ``ModelInfo``."""
    import mlflow.pyfunc

    from mann.train import load_checkpoint, save_checkpoint

    payload = load_checkpoint(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / DATA_FILE
        save_checkpoint(data, {k: payload[k] for k in ("format", "config", "model")})
        return mlflow.pyfunc.log_model(name=name, loader_module=LOADER_MODULE, data_path=str(data),
                                       pip_requirements=PIP_REQUIREMENTS)


class MannPyfunc:
    """What ``mlflow.pyfunc.load_model`` wraps: the MANN in eval mode and its training config."""

    def __init__(self, path: str | Path):
        from mann.train import load_checkpoint, model_from_checkpoint

        self.model, self.config = model_from_checkpoint(load_checkpoint(path))
        self.model.eval()

    def predict(self, model_input: Any, params: dict[str, Any] | None = None):
        """Logits ``[batch, steps, labels]`` (numpy) for episode inputs ``[batch, steps, image + label dims]``
        (numpy or torch)."""
        import numpy as np
        import torch

        inputs = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return self.model(inputs).numpy()

    def get_raw_model(self):
        """The ``torch.nn.Module`` (``PyFuncModel.get_raw_model()``)."""
        return self.model


def _load_pyfunc(data_path: str) -> MannPyfunc:
    """MLflow's loader-module entry point: ``data_path`` is the model's ``data/model.pt``."""
    return MannPyfunc(data_path)


def load_model(model_uri: str, tracking_uri: str | None = None):
    """The ``torch.nn.Module`` of a logged model (``models:/mann@champion``, ``runs:/<id>/model``, a folder).

    This project's format loads tensors only (``weights_only=True``); a model logged in the old pickle format is
    loaded by ``mlflow.pytorch`` after one warning, because unpickling runs code from the artifact store."""
    import mlflow
    import mlflow.artifacts
    from mlflow.models import Model

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    flavors = Model.load(local).flavors
    pyfunc = flavors.get("python_function", {})
    if pyfunc.get("loader_module") == LOADER_MODULE:
        return MannPyfunc(local / pyfunc["data"]).model
    if "pytorch" in flavors:
        log.warning("%s is a pickle (mlflow.pytorch, logged by an older mann-search): loading it runs code from "
                    "the artifact store; log it again to get the weights-only format", model_uri)
        import mlflow.pytorch

        return mlflow.pytorch.load_model(str(local))
    raise ValueError(f"{model_uri}: not a mann-search model (flavors: {', '.join(flavors) or 'none'})")
