"""Faults against real components: MLflow server down mid-search (buffered, delivered, or replayed), a diverging
trial (failed with its reason while the study goes on)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from .conftest import BIN, MlflowServer, node_processes, proc_stat, two_node_ray, wait_for
from .test_config import REPO
from .test_search_e2e import client_for, mann_search, study_runs

pytestmark = pytest.mark.slow

SMALL = ["--set", "budget.num_samples=4", "--set", "overrides.train.episodes=960", "--set", "selection.enabled=false"]


def children_with(client, exp, pred):
    """Child runs of the study in ``exp`` that satisfy ``pred`` (none while the experiment does not exist)."""
    try:
        _, children = study_runs(client, exp)
    except AssertionError:
        return []
    return [c for c in children if pred(c)]


def metric_points(client, run_id, key="val/acc_2plus"):
    return [m.step for m in client.get_metric_history(run_id, key)]


def _parent(pid: int) -> int:
    stat = proc_stat(pid)
    return stat[1] if stat else 0


def _raylet_of(temp_dir: str) -> int:
    """The pid of the raylet whose command line names ``temp_dir`` (one node of :func:`two_node_ray`)."""
    out = subprocess.run(["pgrep", "-f", f"raylet/raylet .*{temp_dir}"], capture_output=True, text=True).stdout
    pids = [int(p) for p in out.split()]
    assert len(pids) == 1, f"expected one raylet for {temp_dir}, found {pids}"
    return pids[0]


def _trial_results(storage) -> dict:
    """Tune's own record of each trial (``result.json``, one line per report): trial dir -> list of results."""
    import json

    results = {}
    for path in storage.glob("smoke-*/t[0-9]*/result.json"):  # trial folders are named after the trial
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        try:
            parsed = [json.loads(line) for line in lines]
        except ValueError:  # the driver is mid-write of the last line
            continue
        if parsed:
            results[path.parent.name] = parsed
    return results


def _two_full_trials(tmp_path, uri, exp, max_failures):
    """`mann-search run` (its own process group) of two smoke trials trained to 3200 episodes, an evaluation and
    checkpoint every 320, no scheduler, no selection; output to tmp_path/run.log."""
    return subprocess.Popen(
        [str(BIN / "mann-search"), "run", "configs/search/smoke.yaml", "--set", f"storage={tmp_path}",
         "--set", f"mlflow.tracking_uri={uri}", "--set", f"mlflow.experiment={exp}",
         "--set", "budget.num_samples=2", "--set", "overrides.train.episodes=3200",
         "--set", "overrides.train.eval_every=320", "--set", "scheduler.kind=none",
         "--set", "selection.enabled=false", "--set", f"budget.max_failures={max_failures}"],
        cwd=REPO, stdout=open(tmp_path / "run.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)


def test_mlflow_down_and_back_then_down_for_good_loses_nothing(tmp_path, omniglot_dir):
    """One study through two MLflow faults: the server is down 5 s and back while trials train (the records of the
    outage are buffered and delivered), then down for good (the study completes, and `mann-search replay`
    delivers what could not be logged once the server is back). Every child ends FINISHED with each evaluation
    logged exactly once."""
    server = MlflowServer(tmp_path / "mlflow").start()
    exp = "faults-outage"
    # 16000 episodes a trial (about 6 s each on an idle machine, 3 rounds of 2): long enough to outlast the 5 s
    # outage and to still run after two trials finished, with reused worker processes
    proc = subprocess.Popen(
        [str(BIN / "mann-search"), "run", "configs/search/smoke.yaml", "--set", f"storage={tmp_path / 'runs'}",
         "--set", f"mlflow.tracking_uri={server.uri}", "--set", f"mlflow.experiment={exp}",
         "--set", "budget.num_samples=6", "--set", "overrides.train.episodes=16000", "--set", "scheduler.kind=none",
         "--set", "overrides.train.eval_every=3200", "--set", "selection.enabled=false"],
        cwd=REPO, stdout=open(tmp_path / "run.log", "w"), stderr=subprocess.STDOUT)
    try:
        client = client_for(server.uri)
        wait_for(lambda: children_with(client, exp, lambda c: c.data.metrics), 240, "a child run with metrics")
        server.kill()  # down while trials train
        time.sleep(5)
        server.start()  # back on the same port, same store
        assert proc.poll() is None, "the study ended before the server came back: make it longer"
        wait_for(lambda: len(children_with(client, exp, lambda c: c.info.status == "FINISHED")) >= 2, 300,
                 "two finished child runs after the outage")
        assert proc.poll() is None, "the study ended before the second outage: make it longer"
        server.stop()  # down for good
        assert proc.wait(600) == 0, (tmp_path / "run.log").read_text()[-3000:]
        log = (tmp_path / "run.log").read_text()
        assert "MLflow unavailable" in log  # the outages were noticed
        assert "could not be logged to MLflow; replay them with: mann-search replay" in log
        replay = next((tmp_path / "runs").glob("smoke-*/mlflow-replay.jsonl"))
        server.start()
        done = mann_search("replay", str(replay))
        assert done.returncode == 0, done.stderr[-2000:]
        assert "delivered" in done.stdout and not replay.exists()
        client = client_for(server.uri)
        parents, children = study_runs(client, exp)
        assert len(parents) == 1 and len(children) == 6
        for c in children:
            assert c.info.status == "FINISHED"
            points = metric_points(client, c.info.run_id)
            assert len(points) == len(set(points)) == int(c.data.metrics["episodes"]) // 3200 == 5, points
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()


def test_diverging_trial_is_failed_with_reason_and_study_goes_on(tmp_path, mlflow_server, omniglot_dir):
    exp = "faults-nan"
    # lr is searched in [1e-3, 1e-2] by default; here one trial in two gets an absurd lr and diverges.
    proc = mann_search("run", "configs/search/smoke.yaml", "--set", f"storage={tmp_path}",
                       "--set", f"mlflow.tracking_uri={mlflow_server.uri}", "--set", f"mlflow.experiment={exp}",
                       "--set", "space.train.lr={type: categorical, choices: [0.003, 1.0e+36]}",
                       "--set", "overrides.train.grad_clip=null", "--set", "sampler.kind=random",
                       "--set", "scheduler.kind=none", *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = client_for(mlflow_server.uri)
    _, children = study_runs(client, exp)
    assert len(children) == 4
    outcomes = {c.data.tags["mann.outcome"] for c in children}
    failed = [c for c in children if c.data.tags["mann.outcome"] == "diverged"]
    assert failed and outcomes <= {"diverged", "completed"} and "completed" in outcomes
    for c in failed:
        assert c.info.status == "FAILED"
        assert "training diverged" in c.data.tags["mann.failure_reason"]
        assert float(c.data.params["train.lr"]) > 1


def test_trial_worker_killed_resumes_from_checkpoint_in_same_run(tmp_path, mlflow_server, omniglot_dir):
    """SIGKILL a training trial's worker process mid-training: Tune retries it from its last checkpoint
    (FailureConfig), it continues in the same MLflow child run and ends at the full episode budget."""

    exp = "faults-worker"
    proc = _two_full_trials(tmp_path, mlflow_server.uri, exp, max_failures=2)
    killed = None
    try:
        client = client_for(mlflow_server.uri)
        wait_for(lambda: children_with(client, exp, lambda c: c.data.metrics.get("episodes", 0) >= 640), 240,
                 "a trial past its second checkpoint")
        # the trial actors of this study: Ray names their processes after the trainable
        out = subprocess.run(["pgrep", "-f", "-s", str(os.getpgid(proc.pid)), "MannTrial"],
                             capture_output=True, text=True).stdout.split()
        assert out, "no trial worker process found to kill"
        killed = int(out[0])
        os.kill(killed, signal.SIGKILL)
        assert proc.wait(600) == 0, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    _, children = study_runs(client, exp)
    assert len(children) == 2  # the retried trial kept its run: no duplicate
    for c in children:
        assert c.info.status == "FINISHED" and c.data.tags["mann.outcome"] == "completed"
        assert c.data.metrics["episodes"] == 3200
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "episodes")]
        assert steps == sorted(set(steps)) and steps[-1] == 3200  # resumed, not restarted; nothing twice
    # Tune's own record of every result: the retried trial went on from its checkpoint instead of starting
    # again from episode 0 (which would report the first evaluation, 320 episodes, a second time).
    records = _trial_results(tmp_path)
    assert len(records) == 2, sorted(records)
    for results in records.values():
        episodes = [r["episodes"] for r in results]
        assert episodes[-1] == 3200 and episodes.count(320.0) == 1, episodes


def test_runs_of_trials_lost_with_the_driver_end_failed_with_the_reason(tmp_path, mlflow_server):
    """At a resumed study's end, a trial run MLflow still has as RUNNING that no Tune trial owns (lost with a
    killed driver) ends FAILED with the reason, its metrics kept; runs of Tune's trials are left to their ends."""
    from search.lineage import end_lost_runs
    from search.searcher import LOST_REASON
    from search.tracking import StudyTracker

    exp = "lost-runs"
    tracker = StudyTracker(mlflow_server.uri, exp, "lost-study", tmp_path / "staging")
    for trial in ("kept", "lost"):
        tracker.trial_started(trial, trial, {"model.memory.slots": 8})
    tracker.trial_result("lost", {"episodes": 320.0, "val/acc_2plus": 0.4}, step=320)
    assert tracker.flush(force=True)
    assert end_lost_runs(tracker, {"kept"}) == 1
    assert tracker.flush(force=True)
    _, children = study_runs(client_for(mlflow_server.uri), exp)
    by = {c.data.tags["mann.trial_id"]: c for c in children}
    assert by["lost"].info.status == "FAILED" and by["lost"].data.tags["mann.outcome"] == "failed"
    assert by["lost"].data.tags["mann.failure_reason"] == LOST_REASON
    assert by["lost"].data.metrics["episodes"] == 320.0
    assert by["kept"].info.status == "RUNNING" and "mann.outcome" not in by["kept"].data.tags
    assert end_lost_runs(tracker, {"kept"}) == 0  # ended once


def test_no_credentials_in_mlflow_params_or_tags(tmp_path, monkeypatch):
    from search.tracking import StudyTracker, redact

    assert redact("db_password", "hunter2") == "***"
    assert redact("uri", "postgresql://mlflow:hunter2@db:5432/mlflow") == "postgresql://***@db:5432/mlflow"
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    tracker = StudyTracker(uri, "creds", "study-1", tmp_path / "staging")
    tracker.start_study({"storage": "s3://AKIAXXX:hunter2@bucket/x", "aws_secret_access_key": "hunter2",
                         "mlflow.tracking_uri": "http://user:hunter2@mlflow:5000"},
                        {"api_token": "hunter2", "note": "https://u:hunter2@example.invalid/"}, {})
    tracker.trial_started("t1", "trial-1", {"train.lr": 0.01, "MLFLOW_TRACKING_PASSWORD": "hunter2"})
    assert tracker.flush(force=True)
    client = tracker.client
    for run in client.search_runs([tracker.experiment_id()]):
        everything = {**run.data.params, **run.data.tags}
        assert all("hunter2" not in str(v) for v in everything.values()), everything


LISTENERS = r"""
import json, os, subprocess
from search.ray_cluster import connect_ray  # before ray: search turns token authentication on
import ray

connect_ray(1)  # what `mann-search run` does without RAY_ADDRESS


@ray.remote
def task():
    return os.environ.get("RAY_AUTH_MODE")


mode = ray.get(task.remote())  # a worker process and the runtime-env agent are up as well
out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
print(json.dumps({"mode": mode, "listen": [line.split() for line in out.splitlines()]}))
ray.shutdown()
"""


def test_local_cluster_listens_on_loopback_only_with_token_auth():
    """Every TCP port of the local Ray that mann-search starts (GCS, raylet, object manager, agents, workers) is
    bound to 127.0.0.1, none to 0.0.0.0 / ::; token authentication is on in its processes."""
    import json

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    proc = subprocess.run([str(BIN / "python"), "-c", LISTENERS], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["mode"] == "token"
    ray_sockets = [row for row in report["listen"] if any(n in row[-1] for n in ("gcs_server", "raylet", "ray::"))]
    names = " ".join(row[-1] for row in ray_sockets)
    assert "gcs_server" in names and "raylet" in names, report["listen"]
    assert len(ray_sockets) >= 5, report["listen"]
    for row in ray_sockets:
        address = row[3].rsplit(":", 1)[0]
        assert address in ("127.0.0.1", "[::ffff:127.0.0.1]"), f"{row[-1]} listens on {row[3]}"
    # imported the other way round with RAY_AUTH_MODE unset: a clear refusal, not a hang
    late = subprocess.run([str(BIN / "python"), "-c", "import ray, search.ray_cluster as r; r.connect_ray(1)"], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert late.returncode != 0 and "import search first" in late.stderr, late.stderr[-2000:]


def test_worker_node_lost_trials_move_to_the_remaining_node(tmp_path, mlflow_server, omniglot_dir):
    """A 2-node `ray start` cluster on 127.0.0.1; the worker node is killed (all its processes, SIGKILL) while a
    trial is provably training on it: that trial is retried on the head node from its checkpoint and the study
    completes with one MLflow run per trial."""
    exp = "faults-node"
    total = 1920
    proc = None
    with two_node_ray() as (env, gcs, _, worker_tmp):
        try:
            raylet = _raylet_of(worker_tmp)
            proc = subprocess.Popen(
                [str(BIN / "mann-search"), "run", "configs/search/smoke.yaml", "--set", f"storage={tmp_path}",
                 "--set", f"mlflow.tracking_uri={mlflow_server.uri}", "--set", f"mlflow.experiment={exp}",
                 "--set", "budget.num_samples=4", "--set", f"overrides.train.episodes={total}",
                 "--set", "overrides.train.eval_every=320", "--set", "scheduler.kind=none",
                 "--set", "selection.enabled=false", "--set", "budget.max_failures=3"],
                cwd=REPO, env={**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"}, stdout=open(tmp_path / "run.log", "w"),
                stderr=subprocess.STDOUT)

            def training_on_worker():
                # a trial whose process is a child of the worker's raylet, with at least one checkpoint and well
                # before its end, so that the kill lands mid-training
                for trial, results in _trial_results(tmp_path).items():
                    last = results[-1]
                    if 320 <= last["episodes"] <= total // 2 and _parent(last["pid"]) == raylet:
                        return trial, last["pid"], last["episodes"]
                return None

            victim, victim_pid, at = wait_for(training_on_worker, 240, "a trial training on the worker node",
                                              every=0.2)
            doomed = node_processes(worker_tmp)  # the raylet, its agents and workers (the victim among them)
            assert victim_pid in doomed, (victim_pid, doomed)
            for pid in doomed:
                os.kill(pid, signal.SIGKILL)
            assert proc.wait(600) == 0, (tmp_path / "run.log").read_text()[-4000:]
        finally:
            if proc is not None and proc.poll() is None:
                proc.kill()
    results = _trial_results(tmp_path)
    moved = [(r["pid"], r["episodes"]) for r in results.get(victim, [])]
    why = f"victim {victim} (pid {victim_pid}, seen at {at}): {moved}\n" + (tmp_path / "run.log").read_text()[-3000:]
    assert len(results) == 4 and all(rs[-1]["episodes"] == total for rs in results.values()), why
    before = [e for pid, e in moved if pid == victim_pid]
    after = [e for pid, e in moved if pid != victim_pid]
    assert moved == [(victim_pid, e) for e in before] + moved[len(before):], why
    assert after and after == sorted(set(after)) and after[-1] == total, why  # it ran again, elsewhere
    # resumed from its last checkpoint, not from episode 0: at most the evaluation interval in flight at the kill
    # (reported by the dying process but not yet recorded as its checkpoint) is trained again
    assert after[0] >= before[-1] and after[0] > at and before[-1] < total, why
    _, children = study_runs(client_for(mlflow_server.uri), exp)
    assert len(children) == 4
    for c in children:
        assert c.info.status == "FINISHED" and c.data.metrics["episodes"] == total, c.data.tags


def test_surviving_checkpoint_picks_the_newest_written_and_leaves_tune_something_to_delete(tmp_path):
    """The choice behind the resume below, on a trial folder laid out by hand: the checkpoint Tune names is gone;
    the newest checkpoint *written* wins (a resumed trial rewrites lower numbers, so not the highest number); the
    named one and the one before it come back empty for Tune to delete; with nothing left, the trial starts over."""
    import pyarrow.fs as pafs
    from ray import tune

    from mann.train import CHECKPOINT_NAME
    from search.trainable import surviving_checkpoint

    from ray.train._internal.session import _TrainingResult  # what Tune hands Trainable.restore

    def Named(path):
        return _TrainingResult(tune.Checkpoint(str(path), filesystem=pafs.LocalFileSystem()), {"episodes": 640.0})

    trial = tmp_path / "t00_trial"
    for index, mtime in ((3, 2_000), (4, 1_000), (5, None)):  # 4: a leftover older than the rewritten 3
        (trial / f"checkpoint_{index:06d}").mkdir(parents=True)
        if mtime is not None:
            (trial / f"checkpoint_{index:06d}" / CHECKPOINT_NAME).write_bytes(b"x")
            os.utime(trial / f"checkpoint_{index:06d}" / CHECKPOINT_NAME, (mtime, mtime))
    named = Named(trial / "checkpoint_000002")
    got = surviving_checkpoint(named)
    assert got is not named and got.checkpoint.path == str(trial / "checkpoint_000003"), got
    assert got.metrics == named.metrics
    assert (trial / "checkpoint_000001").is_dir() and (trial / "checkpoint_000002").is_dir()
    assert not (trial / "checkpoint_000000").exists()
    present = Named(trial / "checkpoint_000004")
    assert surviving_checkpoint(present) is present  # on storage: Tune's own choice stands
    kept = tmp_path / "t02_trial"  # the named one kept, the one before it pruned after the snapshot
    (kept / "checkpoint_000009").mkdir(parents=True)
    (kept / "checkpoint_000009" / CHECKPOINT_NAME).write_bytes(b"x")
    named_kept = Named(kept / "checkpoint_000009")
    assert surviving_checkpoint(named_kept) is named_kept and (kept / "checkpoint_000008").is_dir()
    empty = tmp_path / "t01_trial"
    empty.mkdir()
    assert surviving_checkpoint(Named(empty / "checkpoint_000007")) is None
    assert sorted(p.name for p in empty.iterdir()) == ["checkpoint_000006", "checkpoint_000007"]


def _snapshot_latest_checkpoints(study_dir) -> dict:
    """The checkpoint Tune's newest experiment snapshot names as each trial's latest: trial dir name -> path.
    (Reads Tune's own state with its own decoder: what a resume would ask the trial to restore.)"""
    import json

    from ray.tune.trainable.metadata import _TrainingRunMetadata

    newest = max(study_dir.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    latest = {}
    for _, run_metadata in json.loads(newest.read_text())["trial_data"]:
        result = _TrainingRunMetadata.from_json_state(run_metadata).checkpoint_manager.latest_checkpoint_result
        if result is not None:
            path = result.checkpoint.path
            latest[path.rstrip("/").rsplit("/", 2)[-2]] = path
    return latest


def test_driver_killed_after_pruning_resumes_from_surviving_checkpoint(tmp_path, mlflow_server, omniglot_dir):
    """SIGKILL the driver mid-study, then delete the checkpoint its last experiment snapshot names for each
    trial: the state a kill between Tune's pruning (`num_to_keep`) and its next snapshot leaves (CI hit it). Tune
    alone then fails the trial for good ("does not exist on storage anymore"); `mann-search resume` must go on
    from the trial's newest checkpoint still on storage, and finish every trial at its full budget."""
    import shutil

    exp = "faults-pruned"
    proc = _two_full_trials(tmp_path, mlflow_server.uri, exp, max_failures=1)
    try:
        client = client_for(mlflow_server.uri)
        wait_for(lambda: len(children_with(client, exp, lambda c: c.data.metrics.get("episodes", 0) >= 1280)) == 2,
                 300, "both trials past their fourth checkpoint (older ones pruned)")
        assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray, mid-study
        proc.wait()
    study_dir = next(tmp_path.glob("smoke-*"))
    named = _snapshot_latest_checkpoints(study_dir)
    assert len(named) == 2, named
    for trial_dir, path in named.items():
        shutil.rmtree(path, ignore_errors=True)  # what the pruning does to it (it may have done it already)
        assert (study_dir / trial_dir).is_dir() and not os.path.exists(path)

    resumed = mann_search("resume", str(study_dir))
    said = resumed.stdout + resumed.stderr
    (tmp_path / "resume.log").write_text(said)
    assert resumed.returncode == 0, (resumed.stdout[-2000:], resumed.stderr[-3000:])
    assert "does not exist on storage anymore" not in said, said[-3000:]
    assert "resuming from" in said, said[-3000:]  # the worker's warning names the checkpoint it took
    assert "Error handling checkpoint" not in said and "deleting path" not in said, said[-3000:]
    _, children = study_runs(client, exp)
    assert len(children) == 2, [c.data.tags.get("mlflow.runName") for c in children]
    for c in children:
        assert c.info.status == "FINISHED" and c.data.tags["mann.outcome"] == "completed", c.data.tags
        assert c.data.metrics["episodes"] == 3200
    # Tune's own record: each trial went on from a surviving checkpoint, not from episode 0 (which would report
    # the first evaluation, 320 episodes, a second time)
    records = _trial_results(tmp_path)
    assert sorted(records) == sorted(named), (sorted(records), sorted(named))
    for trial_dir, results in records.items():
        episodes = [r["episodes"] for r in results]
        assert episodes[-1] == 3200 and episodes.count(320.0) == 1, (trial_dir, episodes)


def test_a_lost_trials_configuration_is_trained_again_from_its_checkpoint(tmp_path, omniglot_dir, monkeypatch):
    """A trial the driver gave Tune after Tune's last snapshot trained to its first evaluation and wrote a
    checkpoint, then the driver was killed. On resume its configuration is asked again (``LostTrials``) with that
    checkpoint, and the new trial (real Ray, real training) resumes from it: it reports the checkpoint's own
    history (the first evaluation, marked in the file so that a fresh evaluation cannot pass for it) and goes on
    to the end exactly as the same configuration trained without interruption."""
    import optuna

    import search  # noqa: F401  (before Ray: token auth)
    import ray
    from ray import tune

    from mann.train import CHECKPOINT_NAME, Callback, load_checkpoint, save_checkpoint, train
    from search.config import load_search_config
    from search.protocol import RESUME_KEY, TRIAL_NUMBER_KEY, sampled_point, trial_dirname
    from search.ray_cluster import connect_ray
    from search.runner import build_tuner, make_searcher
    from search.searcher import LOST_REASON, RESUME_ATTR, LostTrials, OptunaStudy
    from search.study import Study

    from .test_study import search_yaml

    monkeypatch.setenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    search = load_search_config(search_yaml(tmp_path), [
        "budget.num_samples=1", "budget.max_concurrent=1", "budget.max_failures=0", "selection.enabled=false",
        "overrides.train.episodes=320", "overrides.train.eval_episodes=16"])
    study = Study.create(search, [], None, path=str(tmp_path / "tune" / "lost"))
    study.local_dir.mkdir(parents=True, exist_ok=True)
    config = make_searcher(study).suggest("lost0001")  # the lost trial, as the searcher gave it to Tune
    folder = study.local_dir / f"{trial_dirname(config)}_lost0001"

    class Collect(Callback):  # the uninterrupted run; its checkpoint at the first evaluation is the lost one's
        def __init__(self):
            self.rows = []

        def on_eval(self, report):
            self.rows.append((report.episodes, {k: v for k, v in report.metrics().items() if k.startswith("val/")}))
            if len(self.rows) == 1:
                payload = load_checkpoint(tmp_path / "plain" / CHECKPOINT_NAME)
                payload["history"][-1]["val/acc_2plus"] = 0.123456  # what only the checkpoint says
                save_checkpoint(folder / "checkpoint_000000" / CHECKPOINT_NAME, payload)

    plain = Collect()
    train(search.trial_config(sampled_point(config), threads=1), callbacks=[plain], out_dir=tmp_path / "plain")
    assert [e for e, _ in plain.rows] == [160, 320]

    LostTrials(study).on_step_begin(0, [])  # the resumed study: Tune knows no trial
    trials = OptunaStudy(study).study.get_trials()
    assert trials[0].state == optuna.trial.TrialState.FAIL and trials[0].user_attrs["outcome.reason"] == LOST_REASON
    assert trials[1].user_attrs[RESUME_ATTR] == str(folder / "checkpoint_000000")

    results = []

    class Watch(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            results.append((trial.config, int(result["episodes"]),
                            {k: result[k] for k in result if k.startswith("val/")}))

    started = connect_ray(num_cpus=1) == "local"
    try:
        grid = build_tuner(study, Watch(), verbose=0).fit()
    finally:
        if started:
            ray.shutdown()
    assert not any(r.error for r in grid)
    assert {c[TRIAL_NUMBER_KEY] for c, _, _ in results} == {1}
    assert results[0][0][RESUME_KEY] == str(folder / "checkpoint_000000")
    assert sampled_point(results[0][0]) == sampled_point(config)
    assert [e for _, e, _ in results] == [160, 320]
    assert results[0][2]["val/acc_2plus"] == 0.123456  # reported from the checkpoint: not trained again
    for key, value in plain.rows[1][1].items():  # then trained on from it as if never interrupted
        assert results[1][2][key] == pytest.approx(value, abs=1e-6), key
    again = OptunaStudy(study).study.get_trials()[1]
    assert again.state == optuna.trial.TrialState.COMPLETE and sorted(again.intermediate_values) == [160, 320]
