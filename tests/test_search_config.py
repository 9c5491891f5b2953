"""Search config validation and define-by-run sampling (no Ray needed)."""

from __future__ import annotations

import numpy as np
import optuna
import pytest

from mann.config import ConfigError
from search.config import load_search_config
from search.space import suggest

from .test_config import REPO

SEARCH = REPO / "configs" / "search"


@pytest.mark.parametrize("name", ["smoke", "quickstart", "cluster"])
def test_shipped_search_configs_load(name):
    loaded = load_search_config(SEARCH / f"{name}.yaml")
    for p in ("model.memory.slots", "model.memory.read_heads", "model.memory.gamma", "model.controller.hidden"):
        assert p in loaded.config.space, p


def write(tmp_path, text):
    (tmp_path / "s.yaml").write_text(text)
    return tmp_path / "s.yaml"


BASE = f"base: {REPO / 'configs' / 'mann' / 'smoke.yaml'}\nname: t\n"


@pytest.mark.parametrize(
    "space,match",
    [
        ("model.memory.slots: {type: int, low: 10, high: 5}", r"space.model.memory.slots.low: must be <= high"),
        ("model.memory.slots: {type: int, low: -4, high: 5}", r"space.model.memory.slots.low: must be >= 1"),
        ("model.memory.gamma: {type: float, low: 0.5, high: 1.5}", r"space.model.memory.gamma.high: must be in"),
        ("model.memory.gamma: {type: float, low: 0, high: 0.9, log: true}", r"low: must be > 0 with log"),
        ("model.controller.kind: {type: categorical, choices: []}", r"choices: a categorical parameter needs"),
        ("model.controller.kind: {type: categorical, choices: [lstm, gru]}", r"space.model.controller.kind.choices\[1\]"),
        ("model.memory.slotz: {type: int, low: 1, high: 5}", r"space.model.memory.slotz: not a MANN setting"),
        ("model.memory: {type: int, low: 1, high: 5}", r"space.model.memory: not a MANN setting"),
        ("model.memory.slots: {type: integer, low: 1, high: 5}", r"space.model.memory.slots.type: must be one of"),
        ("model.memory.slots: {type: int, low: 1, hgih: 5}", r"space.model.memory.slots.hgih: unknown config key"),
        ("model.memory.slots: {type: int, low: 1.5, high: 5}", r"space.model.memory.slots.low: must be an integer"),
    ],
)
def test_invalid_spaces_are_named(tmp_path, space, match):
    with pytest.raises(ConfigError, match=match):
        load_search_config(write(tmp_path, BASE + f"space:\n  {space}\n"))


@pytest.mark.parametrize(
    "extra,match",
    [
        ("constraints: ['model.memory.read_heads <= model.memory.slotz']", r"constraints\[0\]: 'model.memory.slotz'"),
        ("constraints: ['model.memory.read_heads << 3']", r"constraints\[0\]: expected"),
        ("constraints: ['model.memory.width > model.memory.slots']", r"constraints\[0\]: does not hold"),
        ("sampler: {kind: bayes}", r"sampler.kind: must be one of"),
        ("budget: {num_samples: 0}", r"budget.num_samples: must be >= 1"),
        ("resources: {gpus_per_trial: -1}", r"resources.gpus_per_trial: must be >= 0"),
        ("scheduler: {reduction_factor: 1}", r"scheduler.reduction_factor: must be >= 2"),
        ("overrides: {model.memory.slotz: 3}", r"overrides.model.memory.slotz"),
        ("objectives: [{metric: a, mode: max}, {metric: b, mode: min}]", r"scheduler.kind: early stopping"),
        ("mlflow: {registered_model: 'bad name!'}", r"mlflow.registered_model"),
        ("objectives: [{metric: val/acc_2plsu}]", r"objectives\[0\].metric: val/acc_2plsu is not a metric a trial"),
        ("objectives: [{metric: val/acc_9}]", r"val/acc_9 is not a metric a trial reports .*acc_1 \.\.\. acc_4"),
        ("objectives: [{metric: test/acc_2plus}]", r"test characters are held out for selection.*val/acc_2plus"),
        ("objectives: [{metric: acc}]", r"objectives\[0\].metric: acc: an objective is a metric a trial reports"),
        ("optuna: {storage: 'not a url'}", r"optuna.storage: not an SQLAlchemy URL"),
        ("optuna: {storage: 'foo://host/db'}", r"optuna.storage: no SQLAlchemy dialect 'foo'"),
        ("optuna: {storage: 'postgresql+asyncpg://u:secret@h/db'}", r"optuna.storage: the driver of "
                                                                     r"'postgresql\+asyncpg' is not installed"),
    ],
)
def test_invalid_search_settings_are_named(tmp_path, extra, match):
    text = BASE + "space:\n  model.memory.read_heads: {type: int, low: 1, high: 4}\n" + extra + "\n"
    with pytest.raises(ConfigError, match=match):
        load_search_config(write(tmp_path, text))


def test_a_storage_url_never_echoes_its_password(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_search_config(write(tmp_path, BASE + "optuna: {storage: 'foo://user:hunter2@h/db'}\n"))
    assert "hunter2" not in str(err.value)


def test_overrides_given_as_a_section_keep_the_bases_other_settings(tmp_path):
    """``overrides: {train: {episodes: 480}}`` sets train.episodes and keeps the base's other train settings
    (it used to replace the base's whole train section with defaults, silently)."""
    space = "space:\n  model.memory.read_heads: {type: int, low: 1, high: 4}\n"
    loaded = load_search_config(write(tmp_path, BASE + space + "overrides: {train: {episodes: 480}}\n"))
    plain = load_search_config(write(tmp_path, BASE + space))
    assert loaded.base.train.episodes == 480
    assert loaded.base.train.to_dict() == {**plain.base.train.to_dict(), "episodes": 480}


def test_a_misspelt_top_level_key_is_named_before_a_missing_one(tmp_path):
    with pytest.raises(ConfigError, match=r"^extends: unknown config key in .*s.yaml \(known: base, budget"):
        load_search_config(write(tmp_path, "name: t\nextends: x.yaml\nspace: {train.lr: {type: float, low: 0.1, high: 1}}\n"))


def test_missing_base_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"base: nope.yaml: not found beside the search config \(.*"
                                          + str(tmp_path) + r"/nope.yaml\) nor from the working directory"):
        load_search_config(write(tmp_path, "name: t\nbase: nope.yaml\nspace: {train.lr: {type: float, low: 0.1, high: 1}}\n"))
    with pytest.raises(ConfigError, match=r"base: .*gone.yaml: config file not found"):  # an absolute one
        load_search_config(write(tmp_path, f"name: t\nbase: {tmp_path}/gone.yaml\n"
                                           "space: {train.lr: {type: float, low: 0.1, high: 1}}\n"))


def test_constraint_and_condition_hold_in_every_sample(tmp_path):
    text = BASE + """space:
  model.memory.slots: {type: int, low: 1, high: 6}
  model.memory.read_heads: {type: int, low: 1, high: 6}
  model.controller.kind: {type: categorical, choices: [lstm, feedforward]}
  model.controller.hidden: {type: int, low: 8, high: 64, step: 8, when: {model.controller.kind: lstm}}
  train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
constraints:
  - model.memory.read_heads <= model.memory.slots
"""
    loaded = load_search_config(write(tmp_path, text))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen_heads = set()
    for _ in range(200):
        trial = study.ask()
        values = suggest(trial, loaded)
        assert values["model.memory.read_heads"] <= values["model.memory.slots"]
        assert ("model.controller.hidden" in values) == (values["model.controller.kind"] == "lstm")
        if "model.controller.hidden" in values:
            assert values["model.controller.hidden"] % 8 == 0
        assert 1e-4 <= values["train.lr"] <= 1e-2
        seen_heads.add(values["model.memory.read_heads"])
        study.tell(trial, 0.0)
    assert seen_heads == set(range(1, 7))


def test_same_seed_same_points():
    loaded = load_search_config(SEARCH / "smoke.yaml")

    def points(seed):
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=2))
        out = []
        for i in range(6):
            t = study.ask()
            out.append(suggest(t, loaded))
            study.tell(t, float(i % 3))
        return out

    assert points(3) == points(3)
    assert points(3) != points(4)


def test_set_overrides_reach_dotted_maps():
    loaded = load_search_config(SEARCH / "smoke.yaml", ["overrides.train.episodes=320", "budget.num_samples=2"])
    assert loaded.base_tree["train"]["episodes"] == 320 and loaded.config.budget.num_samples == 2
    with pytest.raises(ConfigError, match=r"--set budgte.num_samples: unknown key 'budgte'"):
        load_search_config(SEARCH / "smoke.yaml", ["budgte.num_samples=2"])
    # a field of a space entry: set it and keep the entry's others (it used to make a new entry named ...gamma.low)
    q = load_search_config(SEARCH / "quickstart.yaml", ["space.model.memory.gamma.low=0.85"]).config.space
    assert q["model.memory.gamma"].low == 0.85 and q["model.memory.gamma"].high == 0.99
    assert "model.memory.gamma.low" not in q
    with pytest.raises(ConfigError, match=r"space.model.memory.gamma.lw: unknown config key"):
        load_search_config(SEARCH / "quickstart.yaml", ["space.model.memory.gamma.lw=0.5"])


def test_tpe_counts_open_trials_as_bad_unless_told_not_to():
    """A paused trial stays RUNNING for long: TPE's constant liar (``sampler.constant_liar``, on by default, as in
    Optuna 5 and pinned for an Optuna 4 install) models it as bad, so new samples move away from the trials a
    study holds open; off, TPE leaves them out and samples beside its best finished trial."""
    from search.space import make_sampler

    def spread(sets):
        sampler = make_sampler(load_search_config(SEARCH / "smoke.yaml", ["sampler.n_startup_trials=0", *sets]))
        study = optuna.create_study(direction="maximize", sampler=sampler)
        dist = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}
        for x, v in ((0.1, 0.0), (0.5, 0.0), (0.9, 1.0)):  # the best finished trial at 0.9
            study.add_trial(optuna.trial.create_trial(params={"x": x}, distributions=dist, value=v))
        for i in range(12):  # open (paused) trials crowding the best one
            t = study.ask(dist)
            study._storage.set_trial_param(t._trial_id, "x", 0.85 + 0.01 * (i % 11), dist["x"])
        xs = []
        for _ in range(20):
            t = study.ask(dist)
            xs.append(t.params["x"])
            study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        return sum(abs(x - 0.9) for x in xs) / len(xs)

    liar, ft, off = spread([]), spread(["scheduler.kind=freeze_thaw"]), spread(["sampler.constant_liar=false"])
    assert liar > 2 * off and ft == pytest.approx(liar)


def test_each_sampler_seed_gives_its_own_points_and_the_same_seed_the_same():
    """``sampler.seed`` decides the points for every sampler kind. Optuna's QMCSampler unscrambled (what
    ``sampler.kind: qmc`` built before 2026-12-08) gave the same Sobol points, from the space's lower corner,
    whatever the seed: every qmc study sampled the same configurations."""
    import warnings

    from search.space import make_sampler

    def points(kind, seed):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # QMCSampler is experimental
            sampler = make_sampler(load_search_config(SEARCH / "smoke.yaml", [f"sampler.kind={kind}",
                                                                              f"sampler.seed={seed}"]))
            study = optuna.create_study(direction="maximize", sampler=sampler)
            out = []
            for _ in range(6):
                t = study.ask({"x": optuna.distributions.FloatDistribution(0.0, 1.0)})
                out.append(t.params["x"])
                study.tell(t, 0.0)
        return out

    for kind in ("tpe", "random", "qmc", "nsga2"):
        assert points(kind, 0) == points(kind, 0), kind
        assert points(kind, 0)[1:] != points(kind, 1)[1:], kind  # not only the first (random) point differs


def test_a_sobol_start_covers_the_space_more_evenly_then_hands_over_to_tpe():
    """``sampler.startup: qmc``: TPE's first ``n_startup_trials`` trials are scrambled Sobol points, which leave
    smaller gaps than random draws (the largest gap among 16 points in 2-D, mean over 20 seeds); once that many
    trials finished, TPE itself draws. It is the default; ``random`` gives Optuna's TPE as before."""
    from search.space import SobolStart, make_sampler

    unit = optuna.distributions.FloatDistribution(0.0, 1.0)
    dist = {"x": unit, "y": unit}

    def largest_gap(startup, seed):
        sampler = make_sampler(load_search_config(SEARCH / "smoke.yaml", [
            f"sampler.startup={startup}", f"sampler.seed={seed}", "sampler.n_startup_trials=16"]))
        study = optuna.create_study(sampler=sampler)
        pts = []
        for _ in range(16):
            t = study.ask(dist)
            pts.append((t.params["x"], t.params["y"]))
            study.tell(t, 0.0)
        grid = np.stack(np.meshgrid(np.linspace(0, 1, 41), np.linspace(0, 1, 41)), -1).reshape(-1, 2)
        return float(np.sqrt(((grid[:, None, :] - np.array(pts)[None]) ** 2).sum(-1)).min(1).max())

    sobol = np.mean([largest_gap("qmc", s) for s in range(20)])
    rand = np.mean([largest_gap("random", s) for s in range(20)])
    assert sobol < 0.85 * rand, (sobol, rand)
    print(f"largest gap: Sobol {sobol:.3f}, random {rand:.3f}")

    sampler = make_sampler(load_search_config(SEARCH / "smoke.yaml",
                                              ["sampler.startup=qmc", "sampler.n_startup_trials=3"]))
    assert isinstance(sampler, SobolStart) and isinstance(sampler.model, optuna.samplers.TPESampler)
    assert isinstance(make_sampler(load_search_config(SEARCH / "smoke.yaml", [])), SobolStart)
    before = make_sampler(load_search_config(SEARCH / "smoke.yaml", ["sampler.startup=random"]))
    assert isinstance(before, optuna.samplers.TPESampler)
    study = optuna.create_study(sampler=sampler)
    drawn_by = []
    for i in range(5):
        t = study.ask(dist)
        drawn_by.append(sampler._by_trial[t._trial_id])
        study.tell(t, float(i))
    assert drawn_by == [sampler.start] * 3 + [sampler.model] * 2 and not sampler._by_trial


def test_a_sobol_start_is_refused_for_a_sampler_without_a_start():
    """Set for a sampler kind without a start it is refused by name; left unset it does not apply, and the config
    (as a study's snapshot writes and reads it back) stays valid."""
    for kind in ("random", "qmc", "nsga2", "tpe"):
        cfg = load_search_config(SEARCH / "smoke.yaml", [f"sampler.kind={kind}"]).config
        assert cfg.sampler.kind == kind and cfg.sampler.start == ("qmc" if kind == "tpe" else None)
        assert type(cfg).model_validate(cfg.model_dump()).sampler == cfg.sampler
    with pytest.raises(ConfigError, match=r"sampler.startup: qmc applies to sampler.kind tpe or cmaes .* not random"):
        load_search_config(SEARCH / "smoke.yaml", ["sampler.kind=random", "sampler.startup=qmc"])
    with pytest.raises(ConfigError, match=r"sampler.startup"):
        load_search_config(SEARCH / "smoke.yaml", ["sampler.startup=sobol"])
