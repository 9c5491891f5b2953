"""The search service end to end against real components: local Ray, a real `mlflow server` over HTTP, real
Omniglot and real training (small sizes)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest
import torch

from .conftest import BIN, free_port
from .test_config import REPO

pytestmark = pytest.mark.slow


def mann_search(*args, timeout=600, env=None, **kw):
    full = {**os.environ, **(env or {})}
    return subprocess.run([str(BIN / "mann-search"), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=full, **kw)


def client_for(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def study_runs(client, experiment):
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment} missing"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("mann.role") == "study"]
    children = [r for r in runs if r.data.tags.get("mann.role") == "trial"]
    return parents, children


def artifact_paths(client, run_id, path=""):
    out = []
    for f in client.list_artifacts(run_id, path):
        out += artifact_paths(client, run_id, f.path) if f.is_dir else [f.path]
    return out


def test_smoke_search_lineage_selection_and_champion(tmp_path, mlflow_server, omniglot_dir):
    exp, model_name = "e2e-smoke", "mann-e2e"
    args = ["run", "configs/search/smoke.yaml", "--set", f"storage={tmp_path}",
            "--set", f"mlflow.tracking_uri={mlflow_server.uri}", "--set", f"mlflow.experiment={exp}",
            "--set", f"mlflow.registered_model={model_name}"]
    proc = mann_search(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"selection: version 1 of '[\w-]+' \(t\d+\), test acc 2nd\+ [\d.]+; champion moved to it "
                     r"\(previous champion: none\)", proc.stdout), proc.stdout[-2000:]
    client = client_for(mlflow_server.uri)
    parents, children = study_runs(client, exp)
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    for key in ("mann.git_commit", "mann.data_digest", "mann.version.torch", "mann.version.ray"):
        assert parent.data.tags.get(key), key
    assert parent.data.params["sampler.kind"] == "tpe"
    assert {"summary/search_history.png", "summary/parallel_coordinates.png", "study/search.yaml",
            "summary/selection.json"} <= set(artifact_paths(client, parent.info.run_id))
    trial_ids = set()
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        outcome = child.data.tags["mann.outcome"]
        assert outcome in ("completed", "early_stopped")
        # early stops are visible in the runs table: KILLED, not a green FINISHED
        assert child.info.status == ("FINISHED" if outcome == "completed" else "KILLED")
        assert outcome != "early_stopped" or "stopped by the asha scheduler" in child.data.tags["mann.failure_reason"]
        for p in ("model.memory.slots", "model.memory.read_heads", "model.memory.gamma", "model.controller.hidden",
                  "train.lr", "task.classes"):
            assert p in child.data.params, p
        assert {"val/acc_2plus", "val/acc_1", "val/loss", "train/loss", "episodes"} <= set(child.data.metrics)
        history = client.get_metric_history(child.info.run_id, "val/acc_2plus")
        steps = [m.step for m in history]
        assert steps == sorted(set(steps)) and len(steps) == int(child.data.metrics["episodes"]) // 160
        files = set(artifact_paths(client, child.info.run_id))
        assert {"results/learning_curve.png", "results/accuracy_by_instance.json",
                "checkpoint/checkpoint.pt"} <= files
        assert child.data.tags.get("mann.model_uri", "").startswith("models:/")
        trial_ids.add(child.data.tags["mann.trial_id"])
    assert len(trial_ids) == 4
    tested = [c for c in client.search_runs([parent.info.experiment_id]) if "test/acc_2plus" in c.data.metrics]
    assert len(tested) == 2  # top_k

    # review surfaces: the Model-training view's link and kind tag, the parent's progress, readable trial names
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"
    link = f"{mlflow_server.uri}/#/experiments/{experiment.experiment_id}?workflowType=machine_learning"
    assert f"open:         {link}" in proc.stdout, proc.stdout[-1500:]
    assert "?workflowType=machine_learning" in parent.data.tags["mlflow.note.content"]
    finals = [c.data.metrics["val/acc_2plus"] for c in children]
    for axis in ("by_trial", "by_episodes"):  # one step axis per key, and a best-so-far never goes down
        best = [m.value for m in sorted(client.get_metric_history(parent.info.run_id, f"search/best_objective_{axis}"),
                                        key=lambda m: m.step)]
        assert best and best == sorted(best) and best[-1] == pytest.approx(max(finals)), (axis, best)
    assert "search/best_objective" not in parent.data.metrics
    assert parent.data.metrics["search/trials_completed"] + parent.data.metrics["search/trials_early_stopped"] == 4
    assert parent.data.metrics["search/trials_running"] == 0 and parent.data.metrics["search/trials_failed"] == 0
    assert json.loads(parent.data.tags["mann.trial_outcomes"]) == {
        o: sum(c.data.tags["mann.outcome"] == o for c in children) for o in ("completed", "early_stopped")
        if any(c.data.tags["mann.outcome"] == o for c in children)}
    assert parent.data.metrics["search/episodes_spent"] == sum(c.data.metrics["episodes"] for c in children)
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "search/trials_completed")][-1] == 4
    names = sorted(c.data.tags["mlflow.runName"] for c in children)
    assert [n.split()[0] for n in names] == ["t00", "t01", "t02", "t03"] and all("slots=" in n for n in names)

    # the Optuna study, in Optuna's own storage: every trial with its state, params and values by episode
    import optuna

    study_dir = next(tmp_path.glob("smoke-*"))
    key = json.loads((study_dir / "study.json").read_text())["key"]
    assert parent.data.tags["mann.optuna.study_name"] == key
    storage = parent.data.tags["mann.optuna.storage"]
    assert storage == f"sqlite:///{study_dir / 'optuna.db'}"
    ot_trials = optuna.load_study(study_name=key, storage=storage).trials
    assert len(ot_trials) == 4
    by_tune = {t.user_attrs["tune_trial_id"]: t for t in ot_trials}
    for child in children:
        t = by_tune[child.data.tags["mann.trial_id"]]
        full = child.data.metrics["episodes"] == 480
        assert t.state == (optuna.trial.TrialState.COMPLETE if full else optuna.trial.TrialState.PRUNED)
        assert sorted(t.intermediate_values) == [160 * k for k in range(1, int(child.data.metrics["episodes"]) // 160 + 1)]
        assert t.params["model.memory.slots"] == int(child.data.params["model.memory.slots"])
        # one name everywhere: MLflow's run, Optuna's attribute (its number), Ray's result folder
        assert t.user_attrs["name"] == child.data.tags["mlflow.runName"]
        assert child.data.tags["mlflow.runName"].startswith(f"t{t.number:02d} ")
        assert t.user_attrs["outcome"] == child.data.tags["mann.outcome"]
        assert any(d.name.startswith(f"t{t.number:02d}_slots=") for d in study_dir.iterdir() if d.is_dir())
        if full:
            assert t.value == pytest.approx(child.data.metrics["val/acc_2plus"])

    # the champion loads (weights only: tests/test_model_format.py) and predicts on a real episode
    import mlflow.pyfunc

    from mann.config import DataConfig, TaskConfig
    from mann.episodes import EpisodeSampler
    from mann.omniglot import load_omniglot, make_splits

    mlflow.set_tracking_uri(mlflow_server.uri)
    model = mlflow.pyfunc.load_model(f"models:/{model_name}@champion").get_raw_model()
    data = DataConfig(image_size=12, rotations=False, max_shift=0)
    task = TaskConfig(classes=3, instances=4)
    episode = EpisodeSampler(make_splits(load_omniglot(data), data).test, task).sample(
        8, torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(episode.inputs)
    assert logits.shape == (8, 12, 3) and torch.isfinite(logits).all()

    # selecting again registers a new version but keeps the champion unless the new one is better
    again = mann_search("select", str(study_dir))
    assert again.returncode == 0, again.stderr[-2000:]
    decision = json.loads(again.stdout)
    assert decision["new_version"] == "2" and decision["previous_champion"]["version"] == "1"
    assert decision["promoted"] is False  # same checkpoints, same test episodes: not better
    assert client.get_model_version_by_alias(model_name, "champion").version == "1"

    status = mann_search("status", str(study_dir), "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["states"] == {"TERMINATED": 4}


def test_ctrl_c_ends_a_leg_and_resume_finishes_the_study_without_duplicates(tmp_path, mlflow_server, omniglot_dir):
    """Ctrl-C (SIGINT to the driver's process group, as a terminal sends it) ends a leg, not the study: exit 130
    naming `mann-search resume`, the trials it stopped left RUNNING in Optuna and MLflow (not ended as the study's
    end), no selection; resume and status then use the study's snapshot even when its YAML was edited in between.
    (A SIGKILLed driver and its resume: tests/test_postgres.py.)"""
    import yaml

    exp = "e2e-resume"
    src = yaml.safe_load((REPO / "configs" / "search" / "smoke.yaml").read_text())
    src["base"] = str(REPO / "configs" / "mann" / "smoke.yaml")
    search_yaml = tmp_path / "smoke.yaml"
    search_yaml.write_text(yaml.safe_dump(src, sort_keys=False))
    args = [str(BIN / "mann-search"), "run", str(search_yaml), "--set", f"storage={tmp_path}",
            "--set", f"mlflow.tracking_uri={mlflow_server.uri}", "--set", f"mlflow.experiment={exp}",
            "--set", "budget.num_samples=6", "--set", "overrides.train.episodes=3200",
            "--set", "selection.enabled=false"]
    log = open(tmp_path / "run.log", "w")
    proc = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client = client_for(mlflow_server.uri)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:  # (a trial takes ~2 s with reused workers: look often)
            time.sleep(0.3)
            assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            try:
                _, children = study_runs(client, exp)
            except AssertionError:
                continue
            ended = sum(c.info.status != "RUNNING" for c in children)
            if ended >= 2 and ended < len(children):  # two trials ended, however, and another one trains
                break
        else:
            pytest.fail("no trial finished in time")
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(120) == 130, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    study_dir = next(tmp_path.glob("smoke-*"))
    said = (tmp_path / "run.log").read_text()
    assert f"continue with `mann-search resume {study_dir}`" in said and "study_ended" not in said, said[-3000:]
    import optuna

    key = json.loads((study_dir / "study.json").read_text())["key"]
    left = optuna.load_study(study_name=key, storage=f"sqlite:///{study_dir / 'optuna.db'}").trials
    assert [t for t in left if t.state == optuna.trial.TrialState.RUNNING], [(t.number, t.state) for t in left]
    assert not [t for t in left if t.user_attrs.get("outcome") == "study_ended"]
    parents, children = study_runs(client, exp)
    # the stores agree: a run MLflow has as RUNNING is a trial Optuna has as RUNNING, and every run that ended has
    # its own outcome (a trial asked but not yet started when Ctrl-C came has no MLflow run yet: also left running)
    running = {t.user_attrs.get("tune_trial_id") for t in left if t.state == optuna.trial.TrialState.RUNNING}
    assert parents[0].info.status == "RUNNING" and all(
        c.data.tags["mann.trial_id"] in running if c.info.status == "RUNNING" else c.data.tags.get("mann.outcome")
        for c in children), (
        [(c.data.tags.get("mlflow.runName"), c.info.status, c.data.tags.get("mann.outcome")) for c in children],
        [(t.number, t.state.name, t.user_attrs.get("outcome")) for t in left], said[-3000:])
    assert "View run" not in said and "Tuner.restore" not in said  # MLflow's URL lines, Tune's advice: not ours
    assert not [c for c in children if c.data.tags.get("mann.outcome") == "study_ended"]
    src["overrides"]["train.episodes"] = 320  # edited between run and resume: the snapshot must win
    src["space"]["model.memory.slots"] = {"type": "int", "low": 40, "high": 64}
    search_yaml.write_text(yaml.safe_dump(src, sort_keys=False))
    resumed = mann_search("resume", str(study_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "changed since the study started; using the study's snapshot" in resumed.stderr
    assert "trials by outcome:" in resumed.stdout and "slots" in resumed.stdout
    assert re.search(r"6 trials; this leg took \d+ s", resumed.stdout), resumed.stdout[-2000:]
    status = mann_search("status", str(study_dir), "--json")
    assert status.returncode == 0 and "changed since the study started" in status.stderr
    assert json.loads(status.stdout)["num_samples"] == 6
    snapshot = json.loads(status.stdout)["scheduler"]  # the snapshot's scheduler, only the settings its kind uses
    assert snapshot == {"kind": src["scheduler"]["kind"], "grace_episodes": src["scheduler"]["grace_episodes"],
                        "reduction_factor": src["scheduler"]["reduction_factor"]}, snapshot
    plain = mann_search("status", str(study_dir))
    assert plain.returncode == 0 and f"as a MANN config: mann-search export {study_dir} --trial t" in plain.stdout
    assert f"scheduler kind asha, grace_episodes {src['scheduler']['grace_episodes']}" in plain.stdout
    parents, children = study_runs(client, exp)
    assert len(parents) == 1
    ids = [c.data.tags["mann.trial_id"] for c in children]
    assert len(ids) == len(set(ids)) == 6
    for c in children:
        assert c.info.status == {"completed": "FINISHED", "diverged": "FAILED", "failed": "FAILED"}.get(
            c.data.tags.get("mann.outcome"), "KILLED"), (c.data.tags, c.info.status)
        assert 8 <= int(c.data.params["model.memory.slots"]) <= 32  # the snapshot's space
        if c.data.tags.get("mann.outcome") == "completed":
            assert c.data.metrics["episodes"] == 3200  # the snapshot's budget, not the edited 320
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "episodes")]
        assert len(steps) == len(set(steps)), steps  # no metric point logged twice
    # the same Optuna study went on: one Optuna trial per Tune trial, none told twice, none left running
    ot = optuna.load_study(study_name=key, storage=f"sqlite:///{study_dir / 'optuna.db'}").trials
    told = [t.user_attrs.get("tune_trial_id") for t in ot]
    assert all(told.count(i) == 1 for i in ids), told
    assert not [t for t in ot if t.state == optuna.trial.TrialState.RUNNING]


@pytest.mark.parametrize(
    "extra,env,needle",
    [
        (["--set", "mlflow.tracking_uri=http://127.0.0.1:{port}"], {}, "tracking server not reachable"),
        ([], {"RAY_ADDRESS": "127.0.0.1:{port}"}, "Ray cluster not reachable"),
        (["--set", "space.model.memory.gamma={{type: float, low: 0.5, high: 1.5}}"], {},
         "space.model.memory.gamma.high"),
        (["--set", "overrides.data.val_characters=0"], {}, "data.val_characters: must be >= 1 to train"),
        (["--set", "optuna.storage=foo://host/db"], {}, "optuna.storage: no SQLAlchemy dialect 'foo'"),
        ([], {"MANN_OPTUNA_STORAGE": "not a url"}, "MANN_OPTUNA_STORAGE: not an SQLAlchemy URL"),
        (["--set", "objectives=[{{metric: val/acc_2plsu, mode: max}}]"], {}, "objectives[0].metric: val/acc_2plsu"),
    ],
)
def test_unreachable_services_and_bad_configs_fail_fast_before_anything_starts(tmp_path, extra, env, needle):
    port = free_port()  # nothing listens there
    extra = [e.format(port=port) for e in extra]
    env = {k: v.format(port=port) for k, v in env.items()}
    t0 = time.monotonic()
    proc = mann_search("run", "configs/search/smoke.yaml", "--set", f"storage={tmp_path}", *extra, env=env,
                       timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert time.monotonic() - t0 < 60
    assert not list(tmp_path.glob("smoke-*")), "a study was started"
