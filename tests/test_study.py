"""The Study snapshot, metric names from the evaluated split, the refusal to train without validation
characters, and the one private Ray API behind one function (no Ray cluster needed)."""

from __future__ import annotations

import json
import time

import pytest
import yaml

from mann import metrics
from mann.config import ConfigError, load_train_config
from search.config import load_search_config
from search.study import STUDY_FILE, SearchError, Study

from .test_config import REPO


def search_yaml(tmp_path, **changes):
    src = yaml.safe_load((REPO / "configs" / "search" / "smoke.yaml").read_text())
    src["base"] = str(REPO / "configs" / "mann" / "smoke.yaml")
    src["storage"] = str(tmp_path / "runs")
    for k, v in changes.items():
        src[k] = v
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(src, sort_keys=False))
    return f


def test_snapshot_round_trips_and_ignores_edits_of_the_yaml(tmp_path, capsys):
    f = search_yaml(tmp_path)
    search = load_search_config(f, ["budget.num_samples=3"])
    study = Study.create(search, ["budget.num_samples=3"], f"sqlite:///{tmp_path / 'm.db'}")
    saved = study.save()
    assert saved.name == STUDY_FILE and json.loads(saved.read_text())["metric_schema"]["split"] == "val"

    again = Study.load(study.local_dir)
    assert again == study
    assert capsys.readouterr().err == ""  # nothing changed: nothing said

    # edit the episodes and the slots range in the YAML, as a user might between run and resume
    src = yaml.safe_load(f.read_text())
    src["overrides"]["train.episodes"] = 99
    src["space"]["model.memory.slots"]["high"] = 9
    f.write_text(yaml.safe_dump(src, sort_keys=False))
    edited = Study.load(study.local_dir)
    err = capsys.readouterr().err
    assert "changed since the study started" in err and str(f.resolve()) in err and len(err.strip().splitlines()) == 1
    assert edited == study  # the snapshot, not the file
    assert edited.search.max_episodes == 480 and edited.search.config.space["model.memory.slots"].high == 32
    assert edited.search.config.budget.num_samples == 3


def test_damaged_and_missing_study_files_are_named(tmp_path):
    with pytest.raises(SearchError, match="no study here"):
        Study.load(tmp_path)
    (tmp_path / STUDY_FILE).write_text("{not json")
    with pytest.raises(SearchError, match="damaged study file"):
        Study.load(tmp_path)
    (tmp_path / STUDY_FILE).write_text(json.dumps({"format": 2, "key": "k"}))
    with pytest.raises(SearchError, match="damaged study file"):
        Study.load(tmp_path)


def test_a_study_from_before_snapshots_is_snapshotted_once(tmp_path, capsys):
    f = search_yaml(tmp_path)
    legacy = {"key": "smoke-1", "name": "smoke", "path": str(tmp_path / "runs" / "smoke-1"), "config_file": str(f),
              "overrides": ["budget.num_samples=5"], "tracking_uri": "sqlite:///x.db", "experiment": "e",
              "created": 1.0}
    folder = tmp_path / "runs" / "smoke-1"
    folder.mkdir(parents=True)
    (folder / STUDY_FILE).write_text(json.dumps(legacy))
    study = Study.load(folder)
    assert "predates study snapshots" in capsys.readouterr().err
    assert study.search.config.budget.num_samples == 5 and study.key == "smoke-1"
    assert json.loads((folder / STUDY_FILE).read_text())["format"] == 2


def test_training_and_searching_without_validation_characters_are_refused(tmp_path):
    from mann.train import train

    cfg = load_train_config(REPO / "configs" / "mann" / "smoke.yaml", ["data.val_characters=0"])
    with pytest.raises(ConfigError, match=r"^data\.val_characters: must be >= 1 to train, got 0"):
        train(cfg)
    f = search_yaml(tmp_path)
    with pytest.raises(ConfigError, match=r"data\.val_characters: must be >= 1 to train"):
        load_search_config(f, ["overrides.data.val_characters=0"])


def test_metric_names_come_from_the_split_evaluated():
    m = metrics.evaluation("test", [0.2, 0.6, 0.8], 1.5, [0.01, 0.02, 0.03])
    assert m["test/acc_2plus"] == pytest.approx(0.7) and m["test/acc"] == pytest.approx(1.6 / 3)
    assert metrics.by_instance(m, "test") == [0.2, 0.6, 0.8] and metrics.by_instance(m, "val") == []
    assert m["test/ci95_3"] == 0.03
    with pytest.raises(ValueError, match="unknown split"):
        metrics.name("holdout", "acc")


def test_restored_tuner_callbacks_go_through_the_one_private_ray_api():
    """`Tuner.restore` takes no RunConfig: set_restored_callbacks is the one place that reaches into Ray."""
    from ray import tune

    from search.runner import set_restored_callbacks

    tuner = tune.Tuner(lambda config: None)
    live = tune.Callback()
    set_restored_callbacks(tuner, [live])
    assert tuner._local_tuner.get_run_config().callbacks == [live]
    with pytest.raises(SearchError, match="set_restored_callbacks"):
        set_restored_callbacks(object(), [live])


def test_episode_budget_stops_the_study_once_its_trials_spent_it():
    from search.runner import EpisodeBudget

    budget = EpisodeBudget(1000)
    assert not budget("a", {"episodes": 400}) and not budget("b", {"episodes": 400})
    assert not budget("a", {"episodes": 480})  # a trial's latest count, not a sum of its reports
    assert budget("b", {"episodes": 520}) and budget.stop_all()
    import pickle

    assert pickle.loads(pickle.dumps(budget)).spent == {"a": 480, "b": 520}  # Tune pickles its stoppers


def test_trial_names_say_the_number_and_the_sampled_values():
    from search.protocol import NAME_LIMIT, TRIAL_NUMBER_KEY, sampled_point, trial_dirname, trial_name

    config = {"model.memory.slots": 35, "model.memory.read_heads": 4, "model.memory.gamma": 0.98123,
              "train.lr": 0.0031234, TRIAL_NUMBER_KEY: 7}
    assert trial_name(config) == "t07 slots=35 read_heads=4 gamma=0.981 lr=0.00312"
    assert trial_dirname(config) == "t07_slots=35_read_heads=4_gamma=0.981_lr=0.00312"
    assert TRIAL_NUMBER_KEY not in sampled_point(config) and len(sampled_point(config)) == 4
    assert trial_name({"a.b": 1}, "trial_x1") == "trial_x1 b=1"  # not numbered by a study searcher
    assert len(trial_name({**{f"p.k{i}": "v" * 40 for i in range(20)}, TRIAL_NUMBER_KEY: 1})) == NAME_LIMIT


def _sqlite_study(tmp_path) -> Study:
    """A study of the test search config with its Optuna study in SQLite under ``tmp_path``, its folder made."""
    study = Study.create(load_search_config(search_yaml(tmp_path), []), [], f"sqlite:///{tmp_path / 'm.db'}")
    study.local_dir.mkdir(parents=True, exist_ok=True)
    return study


def test_searcher_restored_from_an_older_checkpoint_leaves_trials_the_storage_finished(tmp_path):
    """The driver dies after telling Optuna a trial ended but before the searcher's next checkpoint: the restored
    searcher neither reports to that trial again (Optuna would refuse) nor changes its state."""
    import optuna

    from search.runner import make_searcher
    from search.searcher import storage_url

    study = _sqlite_study(tmp_path)
    metric = study.search.config.objectives[0].metric
    full = study.search.max_episodes
    searcher = make_searcher(study)
    assert searcher.suggest("a") and searcher.suggest("b")
    searcher.on_trial_result("a", {metric: 0.3, metrics.EPISODES: full // 3})
    checkpoint = tmp_path / "searcher.pkl"
    searcher.save(str(checkpoint))
    searcher.on_trial_complete("a", {metric: 0.6, metrics.EPISODES: full})  # after the last checkpoint

    restored = make_searcher(study)
    restored.restore(str(checkpoint))
    restored.on_trial_result("a", {metric: 0.4, metrics.EPISODES: 2 * full // 3})  # Tune retries "a"
    restored.on_trial_complete("a", {metric: 0.5, metrics.EPISODES: full // 2}, error=False)
    restored.on_trial_result("b", {metric: 0.2, metrics.EPISODES: full // 3})
    restored.on_trial_complete("b", {metric: 0.7, metrics.EPISODES: full})
    trials = optuna.load_study(study_name=study.key, storage=storage_url(study)).get_trials()
    by_number = {t.number: t for t in trials}
    a, b = by_number[searcher.numbers["a"]], by_number[searcher.numbers["b"]]
    assert a.state == optuna.trial.TrialState.COMPLETE and a.value == 0.6
    assert a.intermediate_values == {full // 3: 0.3, full: 0.6}
    assert b.state == optuna.trial.TrialState.COMPLETE and b.value == 0.7


def test_trials_lost_with_the_driver_are_failed_and_their_configurations_asked_again(tmp_path):
    """A killed driver's resumed study: Tune's snapshot has trial "a", the searcher's also "b" (given to Tune after
    Tune's snapshot), and Optuna a trial asked but never given to Tune. At the resumed study's first step both
    lost ones are told FAIL with the reason, and the next trials asked train their configurations again."""
    import optuna

    from search.runner import make_searcher
    from search.protocol import TRIAL_NUMBER_KEY, sampled_point
    from search.searcher import LOST_REASON, REASKED_ATTR, LostTrials, close_open_trials, reask_lost, storage_url
    from search.space import suggest

    study = _sqlite_study(tmp_path)
    metric = study.search.config.objectives[0].metric
    full = study.search.max_episodes
    searcher = make_searcher(study)
    searcher.suggest("a")
    b = searcher.suggest("b")
    searcher.on_trial_result("b", {metric: 0.3, metrics.EPISODES: full // 3})  # "b" trained, then was lost
    asked = searcher.optuna.study.ask()  # the driver died between ask and handing it to Tune
    point = suggest(asked, study.search)

    class Trial:  # Tune's restored trial, as the callback sees it
        trial_id = "a"

    callback = LostTrials(study)
    callback.on_step_begin(0, [Trial()])
    callback.on_step_begin(1, [Trial()])  # only at the first step
    trials = {t.number: t for t in optuna.load_study(study_name=study.key, storage=storage_url(study)).get_trials()}
    lost = [searcher.numbers["b"], asked.number]
    for number in lost:
        assert trials[number].state == optuna.trial.TrialState.FAIL
        assert trials[number].user_attrs["outcome.reason"] == LOST_REASON
    assert trials[searcher.numbers["a"]].state == optuna.trial.TrialState.RUNNING  # Tune still has it
    waiting = sorted((t for t in trials.values() if t.state == optuna.trial.TrialState.WAITING),
                     key=lambda t: t.number)
    assert [t.user_attrs[REASKED_ATTR] for t in waiting] == sorted(lost)
    again = make_searcher(study)
    first, second = again.suggest("c"), again.suggest("d")
    assert sampled_point(first) == sampled_point(b) and first[TRIAL_NUMBER_KEY] != b[TRIAL_NUMBER_KEY]
    assert sampled_point(second) == point  # the configurations, as new Optuna trials

    # Asked again once more (a third loss) and the study ends before it starts: it does not stay WAITING
    reask_lost(again.optuna, [again.numbers["d"]])
    close_open_trials(study, time.monotonic())
    trials = optuna.load_study(study_name=study.key, storage=storage_url(study)).get_trials()
    assert not [t for t in trials if t.state in (optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING)]
    last = max(trials, key=lambda t: t.number)
    assert last.state == optuna.trial.TrialState.PRUNED and last.user_attrs["outcome"] == "study_ended"
    assert last.system_attrs["fixed_params"] == {k: v for k, v in trials[asked.number].params.items()}
    assert trials[again.numbers["c"]].user_attrs["outcome"] == "study_ended"  # running "c" closed the usual way



def test_searcher_on_tune_tells_an_end_when_tune_saves_the_state_that_records_it(tmp_path):
    """On Tune (``tell_on_save``, set by build_tuner) a trial's end reaches Optuna when Tune saves the searcher,
    right after the experiment state that records the end. A driver killed before that resumes the trial in Tune
    (its state still says running), and Optuna gets the end the trial really had, not the one decided before."""
    import optuna

    from search.runner import build_tuner, make_searcher
    from search.searcher import StudySearch, storage_url

    study = _sqlite_study(tmp_path)
    metric = study.search.config.objectives[0].metric
    full = study.search.max_episodes
    tuner = build_tuner(study, [])
    searcher = tuner._local_tuner._tune_config.search_alg
    assert isinstance(searcher, StudySearch) and searcher.tell_on_save and not make_searcher(study).tell_on_save
    # resources.reuse_actors (default true: a worker process runs trial after trial) reaches Tune
    assert tuner._local_tuner._tune_config.reuse_actors is True
    off = Study.create(load_search_config(search_yaml(tmp_path), ["resources.reuse_actors=false",
                                                                  f"storage={tmp_path / 'off'}"]),
                       [], f"sqlite:///{tmp_path / 'o.db'}")
    off.local_dir.mkdir(parents=True, exist_ok=True)
    assert build_tuner(off, [])._local_tuner._tune_config.reuse_actors is False

    def state():
        t = optuna.load_study(study_name=study.key, storage=storage_url(study)).get_trials()[0]
        return t.state, t.value, t.intermediate_values

    searcher.suggest("a")
    searcher.on_trial_result("a", {metric: 0.3, metrics.EPISODES: full // 3})
    checkpoint = tmp_path / "searcher.pkl"
    searcher.save(str(checkpoint))
    searcher.on_trial_complete("a", {metric: 0.35, metrics.EPISODES: 2 * full // 3})  # stopped early...
    assert state()[0] == optuna.trial.TrialState.RUNNING  # ...and the driver killed before Tune saved
    restored = make_searcher(study)
    restored.restore(str(checkpoint))
    assert restored.tell_on_save
    restored.on_trial_result("a", {metric: 0.35, metrics.EPISODES: 2 * full // 3})  # Tune resumes "a"
    restored.on_trial_complete("a", {metric: 0.8, metrics.EPISODES: full})
    assert state()[0] == optuna.trial.TrialState.RUNNING
    restored.save(str(checkpoint))
    assert state() == (optuna.trial.TrialState.COMPLETE, 0.8, {full // 3: 0.3, 2 * full // 3: 0.35, full: 0.8})


def test_warm_start_copies_the_finished_trials_that_are_points_of_the_new_space(tmp_path):
    """A second study seeded with the first's trials (``optuna.warm_start``): a trial is copied, with its value
    or intermediate values, only if the configuration it trained lies in the new space."""
    import optuna

    from search.runner import make_searcher
    from search.searcher import WARM_ATTR, OptunaStudy, trial_outcomes, warm_sources, warm_start

    (tmp_path / "a").mkdir()
    first = Study.create(load_search_config(search_yaml(tmp_path / "a"), []), [], f"sqlite:///{tmp_path / 'a.db'}")
    first.save()
    metric, full = first.search.config.objectives[0].metric, first.search.max_episodes
    fixed = {"model.memory.slots": 16, "model.memory.read_heads": 1, "model.memory.gamma": 0.9,
             "model.controller.hidden": 32}
    points = [(16, 2e-3, "done"), (8, 2e-3, "done"), (16, 5e-3, "pruned"), (16, 1.5e-3, "pruned"), (16, 2e-3, "")]
    searcher = make_searcher(first)
    for i, (width, lr, end) in enumerate(points):
        OptunaStudy(first).study.enqueue_trial({**fixed, "model.memory.width": width, "train.lr": lr})
        tid = f"t{i}"
        searcher.suggest(tid)
        searcher.on_trial_result(tid, {metric: 0.3 + i / 100, metrics.EPISODES: full // 3})
        if end:
            searcher.on_trial_complete(tid, {metric: 0.5 + i / 100, metrics.EPISODES: full if end == "done" else
                                             2 * full // 3})

    # the second study: a narrower learning rate, the memory width fixed at the base's 16
    space = yaml.safe_load((REPO / "configs" / "search" / "smoke.yaml").read_text())["space"]
    space.pop("model.memory.width")
    space["train.lr"] = {"type": "float", "low": 1e-3, "high": 3e-3, "log": True}
    (tmp_path / "b").mkdir()
    loaded = load_search_config(search_yaml(tmp_path / "b", space=space,
                                            optuna={"warm_start": [str(first.local_dir)]}), [])
    assert loaded.base.model.memory.width == 16
    second = Study.create(loaded, [], f"sqlite:///{tmp_path / 'b.db'}")
    second.save()
    assert warm_start(second) == {first.key: 2}  # (8, ...) and lr 5e-3 are not points of the new space
    trials = OptunaStudy(second).study.get_trials()
    assert [t.user_attrs[WARM_ATTR] for t in trials] == [first.key] * 2
    assert [(t.state, t.params["train.lr"]) for t in trials] == [(optuna.trial.TrialState.COMPLETE, 2e-3),
                                                                 (optuna.trial.TrialState.PRUNED, 1.5e-3)]
    assert trials[0].value == 0.5 and trials[1].intermediate_values == {full // 3: 0.3 + 3 / 100, 2 * full // 3: 0.53}
    assert "model.memory.width" not in trials[0].params and trial_outcomes(second) == {}
    config = make_searcher(second).suggest("new")  # this study's own trials come after the copied ones
    assert config["trial_number"] == 2
    with pytest.raises(SearchError, match="warm start goes into a new study only"):
        warm_start(second)

    # `mann-search export`: a trial as a complete MANN config, by default the best that ran its full budget
    from search.searcher import trial_recipe

    label, cfg, what = trial_recipe(first)
    assert label == "t01" and "completed" in what and cfg.model.memory.width == 8 and cfg.train.lr == 2e-3
    f = tmp_path / "recipe.yaml"
    f.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    assert load_train_config(f) == cfg
    assert trial_recipe(first, "3")[1].train.lr == 1.5e-3  # a pruned trial, named
    with pytest.raises(SearchError, match=r"--trial t00: no such trial .* \(its trials: t02\)"):
        trial_recipe(second, "t00")  # copied by the warm start: not a trial of this study
    with pytest.raises(SearchError, match="no trial ran its full budget yet"):
        trial_recipe(second)

    with pytest.raises(SearchError, match=r"optuna.warm_start\[0\]: .*nowhere: no study here"):
        warm_sources(loaded, [str(tmp_path / "nowhere")])
    other = load_search_config(search_yaml(tmp_path / "b", objectives=[{"metric": "val/acc_2", "mode": "max"}]), [])
    with pytest.raises(SearchError, match=r"optuna.warm_start\[0\]: .*objectives \['val/acc_2plus'\]"):
        warm_sources(other, [str(first.local_dir)])
