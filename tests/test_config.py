"""Strict YAML -> typed config mapping: every error names the dotted path of the culprit."""

from __future__ import annotations

from pathlib import Path

import pytest

from mann.config import ConfigError, TrainConfig, load_train_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs" / "mann").glob("*.yaml")))
def test_shipped_configs_load(name):
    cfg = load_train_config(REPO / "configs" / "mann" / f"{name}.yaml")
    assert isinstance(cfg, TrainConfig)


def test_paper_config_is_the_paper_setup():
    cfg = load_train_config(REPO / "configs" / "mann" / "paper.yaml")
    m = cfg.model.memory
    assert (cfg.task.classes, cfg.task.instances, cfg.data.image_size) == (5, 10, 20)
    assert (m.slots, m.width, m.read_heads, m.gamma) == (128, 40, 4, 0.95)
    assert (cfg.model.controller.kind, cfg.model.controller.hidden, cfg.train.batch_size) == ("lstm", 200, 16)
    assert cfg.data.train_characters == 1200


def test_time_to_accuracy_config_is_the_paper_model():
    """paper_fast.yaml trains the paper's model (task, data, sizes); it differs in training and two readings."""
    paper, fast = (load_train_config(REPO / "configs" / "mann" / f"{n}.yaml") for n in ("paper", "paper_fast"))
    assert fast.task == paper.task and fast.data == paper.data
    same = ("slots", "width", "read_heads", "gamma", "write_content", "zero_least_used", "init_value")
    assert all(getattr(fast.model.memory, k) == getattr(paper.model.memory, k) for k in same)
    assert fast.model.controller == paper.model.controller


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["model.memory.slotz=3"], r"--set model.memory.slotz: unknown key 'slotz' under model.memory"),
        (["model.memory.slots=0"], r"model.memory.slots: must be >= 1, got 0"),
        (["model.memory.slots=many"], r"model.memory.slots: expected an integer, got 'many'"),
        (["model.memory.slots=2.5"], r"model.memory.slots: expected an integer"),
        (["model.memory.gamma=1.5"], r"model.memory.gamma: must be in \(0, 1\]"),
        (["model.memory.gamma=0"], r"model.memory.gamma: must be in \(0, 1\]"),
        (["model.memory.read_heads=200"], r"model.memory.read_heads: must be <= slots"),
        (["model.memory.write_content=value"], r"model.memory.write_content: must be one of 'key', 'add'"),
        (["model.memory.zero_least_used=yes please"], r"model.memory.zero_least_used: expected true or false"),
        (["train.lr=-1"], r"train.lr: must be > 0"),
        (["train.lr=.nan"], r"train.lr: expected a finite number"),
        (["train.lr_milestones=[800, 400]"], r"train.lr_milestones\[1\]: must be ascending, got 400"),
        (["train.lr_milestones=[0]"], r"train.lr_milestones\[0\]: must be >= 1, got 0"),
        (["train.lr_milestones=[10, x]"], r"train.lr_milestones\[1\]: expected an integer, got 'x'"),
        (["train.lr_milestones=800"], r"train.lr_milestones: expected a list, got 800"),
        (["train.lr_decay=0"], r"train.lr_decay: must be in \(0, 1\], got 0"),
        (["task.instances=21"], r"task.instances: Omniglot has 20 drawers"),
        (["task.sampling=shuffled"], r"task.sampling: must be one of 'balanced', 'random', got 'shuffled'"),
        (["task.steps=0", "task.sampling=random"], r"task.steps: must be >= 1, got 0"),
        (["task.steps=many"], r"task.steps: expected an integer, got 'many'"),
        (["task.steps=40"], r"task.steps: balanced sampling has classes \* instances = 50 steps, got 40"),
        (["train.string_loss=max"], r"train.string_loss: must be one of 'mean', 'sum', got 'max'"),
        (["model=3"], r"model: expected a mapping"),
        (["model.memory.slots.x=3"], r"'model.memory.slots' is a value, not a section"),
        (["nokey"], r"expected KEY.PATH=VALUE"),
        (["model.kind=feedforward"], r"model.controller.kind: the 'feedforward' baseline needs"),
        (["data.val_characters=1300"], r"data.val_characters: must be < train_characters"),
    ],
)
def test_bad_values_name_their_path(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_train_config(REPO / "configs" / "mann" / "paper.yaml", overrides)


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  memory:\n    slots: 8\n    gama: 0.9\n")
    with pytest.raises(ConfigError, match=r"model.memory.gama: unknown config key"):
        load_train_config(path)


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_train_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML at line"):
        load_train_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_train_config(bad)


def test_overrides_apply_and_round_trip():
    cfg = load_train_config(REPO / "configs" / "mann" / "smoke.yaml",
                            ["model.memory.slots=64", "train.grad_clip=null", "model.memory.key_strength=learned"])
    assert cfg.model.memory.slots == 64 and cfg.train.grad_clip is None
    from mann.config import train_config_from_dict

    assert train_config_from_dict(cfg.to_dict()) == cfg


def test_string_configs_are_the_papers_episodes_and_the_balanced_one_stays_reachable():
    c15 = load_train_config(REPO / "configs" / "mann" / "strings15.yaml")
    assert (c15.task.classes, c15.task.length, c15.task.sampling, c15.task.labels) == (15, 100, "random", "string")
    c5 = load_train_config(REPO / "configs" / "mann" / "strings5.yaml")
    assert (c5.task.classes, c5.task.length, c5.task.sampling, c5.task.labels) == (5, 50, "random", "string")
    old = load_train_config(REPO / "configs" / "mann" / "strings15.yaml",
                            ["task.sampling=balanced", "task.steps=null"])
    assert (old.task.classes, old.task.instances, old.task.length) == (15, 10, 150)


def test_new_keys_default_to_the_earlier_behaviour():
    # a config written before task.sampling, task.steps and train.string_loss existed means what it meant
    cfg = load_train_config(REPO / "configs" / "mann" / "paper.yaml")
    assert (cfg.task.sampling, cfg.task.steps, cfg.task.length, cfg.train.string_loss) == ("balanced", None, 50, "mean")


def test_a_key_set_twice_in_a_yaml_mapping_is_refused_naming_it_and_its_line(tmp_path):
    """PyYAML keeps the last of two equal keys silently (a second ``seed:`` overrode the first unseen)."""
    f = tmp_path / "dup.yaml"
    f.write_text("seed: 1\ntrain:\n  lr: 0.01\n  episodes: 100\n  lr: 0.02\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: line 5: lr is set twice in one mapping"):
        load_train_config(f)
    f.write_text("seed: 1\ntrain:\n  lr: 0.01\nseed: 2\n")
    with pytest.raises(ConfigError, match=r"line 4: seed is set twice"):
        load_train_config(f)


def test_a_mapping_for_a_whole_section_sets_only_what_it_names():
    """``--set 'train={episodes: 5}'`` (or a search config's ``overrides: {train: {episodes: 5}}``) sets
    train.episodes and keeps every other train setting of the file; it used to replace the section, resetting the
    settings it left out to their defaults silently. A misspelt key inside the mapping is named by its path."""
    base = load_train_config("configs/mann/small.yaml")
    cfg = load_train_config("configs/mann/small.yaml", ["train={episodes: 5, eval_every: 5}"])
    assert cfg.train.episodes == 5 and cfg.train.eval_every == 5
    assert cfg.train.lr == base.train.lr and cfg.train.eval_episodes == base.train.eval_episodes
    assert cfg.train.lr != TrainConfig().train.lr  # small.yaml's, not the default: the section was kept
    assert load_train_config("configs/mann/small.yaml", ["model={memory: {slots: 7}}"]).model.memory.slots == 7
    with pytest.raises(ConfigError, match=r"train.episdes: unknown key 'episdes' under train"):
        load_train_config("configs/mann/small.yaml", ["train={episdes: 5}"])
