"""The learning-curve recorder: real (tiny) trainings into a table in the documented format, in legs."""

from __future__ import annotations

import json

import pytest

from mann.config import ConfigError
from search.bench.curves import FORMAT, draw_points, read_table, record
from search.config import load_search_config

from .test_config import REPO

SMOKE = str(REPO / "configs" / "search" / "smoke.yaml")
TINY = ["overrides.train.episodes=320", "overrides.train.eval_every=160", "overrides.train.eval_episodes=16"]


def test_recorded_table_has_the_documented_format_and_goes_on_in_legs(tmp_path, omniglot_dir):
    out = tmp_path / "curves" / "smoke.jsonl"
    assert record(SMOKE, TINY, out, configs=2, seeds=1, workers=1) == 2
    head, curves = read_table(out)
    assert head["format"] == FORMAT and head["max_episodes"] == 320 and head["instances"] == 4
    assert head["objective"] == {"metric": "val/acc_2plus", "mode": "max"}
    assert sorted((c["config_id"], c["seed"]) for c in curves) == [(0, 0), (1, 0)]
    for c in curves:
        assert c["episodes"] == [160, 320] and len(c["acc_by_instance"]) == 2 and len(c["acc_by_instance"][0]) == 4
        assert all(0 <= v <= 1 for v in c["objective"]) and c["train_s"][0] < c["train_s"][1]
        assert c["point"]["model.memory.read_heads"] <= c["point"]["model.memory.slots"]
        assert c["commit"] and c["machine"] and c["command"]
    # a second leg with a second seed trains only what is missing
    assert record(SMOKE, TINY, out, configs=2, seeds=2, workers=2) == 2
    _, curves = read_table(out)
    assert sorted((c["config_id"], c["seed"]) for c in curves) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert {json.dumps(c["point"], sort_keys=True) for c in curves if c["config_id"] == 0} == {
        json.dumps(curves[0]["point"], sort_keys=True)}
    with pytest.raises(ConfigError, match="recorded for another search"):
        record(SMOKE, TINY[:1], out, configs=2, seeds=1, workers=1)


def test_draws_are_distinct_and_repeatable():
    search = load_search_config(SMOKE)
    a = draw_points(search, 20, seed=3)
    assert a == draw_points(search, 20, seed=3) and a != draw_points(search, 20, seed=4)
    assert len({json.dumps(p, sort_keys=True) for p in a}) == 20


def test_bad_tables_are_named(tmp_path):
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"format": "other"}\n')
    with pytest.raises(ConfigError, match="not a curves table"):
        read_table(bad)
    bad.write_text(json.dumps({"format": FORMAT}) + "\n" + json.dumps({"seed": 0}) + "\n")
    with pytest.raises(ConfigError, match=r"t.jsonl:2: curve without config_id"):
        read_table(bad)
