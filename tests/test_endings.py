"""Every way a trial ends is labelled the same in MLflow and in Optuna, whatever ended it (search/protocol.py):
a real study on real Omniglot with real training, ended by the study's episode cap, by its time budget, or by a
trial that fails; no trial run is left RUNNING."""

from __future__ import annotations

import json

import optuna
import pytest

from .test_search_e2e import client_for, mann_search, study_runs

pytestmark = pytest.mark.slow

OPTUNA = {"completed": "COMPLETE", "early_stopped": "PRUNED", "episode_cap": "PRUNED", "time_budget": "PRUNED",
          "study_ended": "PRUNED", "diverged": "FAIL", "failed": "FAIL"}
MLFLOW = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


def _study(tmp_path, exp, *overrides):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = mann_search("run", "configs/search/smoke.yaml", "--set", f"storage={tmp_path / 'runs'}",
                       "--set", f"mlflow.tracking_uri={uri}", "--set", f"mlflow.experiment={exp}",
                       "--set", "selection.enabled=false", "--set", "scheduler.kind=none", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study_dir = next((tmp_path / "runs").glob("smoke-*"))
    key = json.loads((study_dir / "study.json").read_text())["key"]
    trials = optuna.load_study(study_name=key, storage=f"sqlite:///{study_dir / 'optuna.db'}").trials
    _, children = study_runs(client_for(uri), exp)
    return proc, study_dir, trials, children


def _check_labels(trials, children):
    """Each trial's outcome agrees in MLflow (tag, status, reason) and Optuna (state, attributes, name)."""
    by_name = {t.user_attrs["name"]: t for t in trials}
    assert len(by_name) == len(trials) == len(children)
    for c in children:
        outcome, name = c.data.tags.get("mann.outcome"), c.data.tags["mlflow.runName"]
        t = by_name[name]
        assert outcome in OPTUNA, (name, outcome, c.info.status)
        assert t.state.name == OPTUNA[outcome] and t.user_attrs["outcome"] == outcome, (name, t.state, outcome)
        assert c.info.status == MLFLOW[t.state.name], (name, c.info.status)
        if outcome == "failed":  # Optuna hears only that it raised; MLflow has the error (and error.txt)
            assert t.user_attrs["outcome.reason"] == "the trial raised" and c.data.tags["mann.failure_reason"]
        else:
            assert c.data.tags["mann.failure_reason"] == t.user_attrs["outcome.reason"]
    return {c.data.tags["mann.outcome"] for c in children}


def test_the_episode_cap_and_a_failing_trial_end_every_run_with_its_outcome(tmp_path, omniglot_dir):
    """The cap ends the trials that run when it is spent (before: they stayed RUNNING in MLflow for good, with
    no outcome), and a trial that raises (its data folder does not exist) is failed with its error."""
    proc, study_dir, trials, children = _study(
        tmp_path, "endings-cap", "--set", "budget.max_episodes=1200", "--set", "sampler.kind=random",
        "--set", "sampler.seed=3", "--set", "budget.max_failures=0",
        "--set", f"space.data.data_dir={{type: categorical, choices: ['{omniglot_dir}', '{tmp_path}/no-data']}}")
    outcomes = _check_labels(trials, children)
    assert {"episode_cap", "failed"} <= outcomes, outcomes  # both endings happened in this study
    for c in children:
        bad = c.data.params["data.data_dir"].endswith("no-data")
        assert (c.data.tags["mann.outcome"] == "failed") == bad
        if bad:
            assert "no-data" in c.data.tags["mann.failure_reason"], c.data.tags["mann.failure_reason"]
        if c.data.tags["mann.outcome"] == "episode_cap":
            assert c.data.metrics["episodes"] < 480 and "episode cap" in c.data.tags["mann.failure_reason"]
    assert sum(c.data.metrics.get("episodes", 0) for c in children) >= 1200
    assert "trials by outcome:" in proc.stdout and "episode_cap" in proc.stdout

    status = mann_search("status", str(study_dir), "--json")
    assert status.returncode == 0, status.stderr[-2000:]
    assert "Using an existing study" not in status.stderr  # the libraries kept quiet
    info = json.loads(status.stdout)
    assert sum(info["outcomes"].values()) == len(trials) and "running" not in info["outcomes"]
    assert info["trial_outcomes"] == {c.data.tags["mlflow.runName"]: c.data.tags["mann.outcome"] for c in children}


def test_the_time_budget_ends_running_trials_as_time_budget(tmp_path, omniglot_dir):
    _, _, trials, children = _study(
        tmp_path, "endings-time", "--set", "budget.time_budget_s=25", "--set", "budget.num_samples=2",
        "--set", "overrides.train.episodes=480000")  # far beyond what 25 s can train
    outcomes = _check_labels(trials, children)
    assert outcomes == {"time_budget"}, outcomes
    for c in children:
        # (on a loaded machine a trial can be ended before its first evaluation, with no `episodes` logged)
        assert "time budget" in c.data.tags["mann.failure_reason"] and c.data.metrics.get("episodes", 0) < 480000
