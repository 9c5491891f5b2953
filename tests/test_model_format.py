"""The champion loads without unpickling: a real tiny training, its model logged by the study's tracker to a real
MLflow server, registered with alias ``champion``, and loaded back by ``mlflow.pyfunc.load_model`` and
``search.load_model`` with the checkpoint's predictions; the old pickle format still loads, with one warning."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from .conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory, omniglot_dir):
    """A real checkpoint of a tiny training and a fixed validation episode batch."""
    from mann.config import load_train_config
    from mann.train import load_splits, make_sampler, train

    out = tmp_path_factory.mktemp("train")
    cfg = load_train_config(REPO / "configs/mann/smoke.yaml", ["train.episodes=64", "train.eval_every=32",
                                                               "train.eval_episodes=16"])
    train(cfg, out_dir=out)
    episode = make_sampler(load_splits(cfg.data), "val", cfg).sample(4, torch.Generator().manual_seed(0))
    return out / "checkpoint.pt", episode.inputs


def _champion(mlflow_server, tmp_path, checkpoint, name):
    """Log the checkpoint as a trial's model through the study's tracker, register it, make it champion."""
    import mlflow

    from search.tracking import StudyTracker

    tracker = StudyTracker(mlflow_server.uri, f"exp-{name}", f"study-{name}", tmp_path / "staging")
    tracker.trial_started("trial_1", "t01 slots=32", {"model.memory.slots": 32})
    tracker.trial_finished("trial_1", "completed", None, checkpoint)
    assert tracker.flush(force=True), tracker.last_error
    run = tracker.client.get_run(tracker.run_id("trial_1"))
    mlflow.set_tracking_uri(mlflow_server.uri)
    version = mlflow.register_model(run.data.tags["mann.model_uri"], name)
    tracker.client.set_registered_model_alias(name, "champion", version.version)
    return tracker


def _reference(checkpoint, inputs) -> np.ndarray:
    from mann.train import load_checkpoint, model_from_checkpoint

    model, _ = model_from_checkpoint(load_checkpoint(checkpoint))
    model.eval()
    with torch.no_grad():
        return model(inputs).numpy()


def test_champion_loads_weights_only_with_the_checkpoints_predictions(tmp_path, mlflow_server, trained,
                                                                     monkeypatch):
    import mlflow.pyfunc

    import search

    checkpoint, inputs = trained
    _champion(mlflow_server, tmp_path, checkpoint, "mann-format")
    expected = _reference(checkpoint, inputs)

    loads = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    pyfunc = mlflow.pyfunc.load_model("models:/mann-format@champion")
    assert pyfunc.metadata.flavors["python_function"]["loader_module"] == "search.model_format"
    assert "pytorch" not in pyfunc.metadata.flavors  # nothing in the artifact store is unpickled
    np.testing.assert_array_equal(pyfunc.predict(inputs.numpy()), expected)
    model = pyfunc.get_raw_model()
    assert isinstance(model, torch.nn.Module)
    module = search.load_model("models:/mann-format@champion", mlflow_server.uri)
    with torch.no_grad():
        np.testing.assert_array_equal(module(inputs).numpy(), expected)
    assert loads and all(w is True for w in loads), loads


def test_old_pickle_models_still_load_with_one_warning(tmp_path, mlflow_server, trained, caplog):
    import mlflow
    import mlflow.pytorch

    import search
    from mann.train import load_checkpoint, model_from_checkpoint

    checkpoint, inputs = trained
    model, _ = model_from_checkpoint(load_checkpoint(checkpoint))
    model.eval()
    mlflow.set_tracking_uri(mlflow_server.uri)
    mlflow.set_experiment("exp-old-format")
    with mlflow.start_run():  # how mann-search logged models before: mlflow.pytorch, pickled
        info = mlflow.pytorch.log_model(model, name="model", serialization_format="pickle",
                                        pip_requirements=["torch"])
    with caplog.at_level(logging.WARNING, logger="mann_search"):
        old = search.load_model(info.model_uri)
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("mann_search")]
    assert len(warnings) == 1 and "is a pickle" in warnings[0], warnings
    with torch.no_grad():
        np.testing.assert_array_equal(old(inputs).numpy(), _reference(checkpoint, inputs))
