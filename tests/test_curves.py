"""The learning-curve recorder: real (tiny) trainings into a table in the documented format, in legs."""

from __future__ import annotations

import json

import numpy as np
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
        assert len(c["read_entropy"]) == 2 and all(0 <= v <= 1 for v in c["read_entropy"])  # the memory signal
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


def test_rank_correlation_and_auroc_hand_computed():
    from search.bench.signals import auroc, ranks, spearman

    assert ranks([3, 1, 2, 2]).tolist() == [4.0, 1.0, 2.5, 2.5]
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # pairs (positive, negative): 0.35 > 0.1, 0.35 < 0.4, 0.8 > both; a tie counts half
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)


def test_signal_power_sees_an_early_signal_that_points_the_wrong_way():
    """Five hand-made curves of 4 evaluations over 100 episodes: the ones that start higher end lower, and the
    read entropy at 25 % orders them the right way."""
    from search.bench.signals import signal_power

    curves = []
    for k in range(5):
        start, end = 0.5 - 0.05 * k, 0.4 + 0.1 * k  # the later a curve starts low, the higher it ends
        curves.append({"episodes": [25, 50, 75, 100], "objective": [start, start, start, end],
                       "acc_by_instance": [[0.3, start]] * 4, "val_loss": [1.0] * 4, "train_loss": [1.0] * 4,
                       "read_entropy": [0.9 - 0.1 * k] * 4, "train_s": [1.0, 2.0, 3.0, 4.0], "wall_s": 5.0})
    curves.append({"episodes": [25, 50], "objective": [0.3, 0.3], "wall_s": 9.0})  # stopped short: cost only
    out = signal_power(curves, 100, fractions=(0.25, 1.0), n_boot=200)
    assert out["used"] == 5 and out["clicked"] == 4  # plateau 0.4, best end 0.8: click level 0.5
    assert out["signals"]["objective"]["0.25"]["spearman"] == -1.0
    assert out["signals"]["objective"]["0.25"]["auroc_click"] == 0.0
    assert out["signals"]["objective"]["1"]["spearman"] == 1.0
    assert out["signals"]["neg_read_entropy"]["0.25"]["spearman"] == 1.0
    assert out["signals"]["acc_1"]["0.25"]["spearman"] is None  # constant: no rank correlation
    sh = out["shape"]  # click level 0.5: curve 0 starts on it (25 %), curves 1-4 reach it at their last evaluation
    assert sh["click_at_median"] == 1.0 and sh["click_at_quartiles"] == [1.0, 1.0] and sh["never_click"] == 0.0
    assert sh["configs"] == 5 and sh["click_time_vs_final"] == pytest.approx(0.707, abs=1e-3)  # ranks 1,3.5x4
    assert sh["cost"] == {"train_s": 20.0, "wall_s": 25.0 + 9.0, "median_curve_wall_s": 5.0}
    assert sh["final_by_config"] == {"best": 0.8, "top_quartile": 0.7, "median": 0.6, "worst": 0.4}


def test_signals_of_the_recorded_quickstart_table(capsys):
    """The recorded quickstart table (real curves): its accuracy at 10 % of the budget is anti-correlated with
    the final one, which is why ranking trials early misleads (README, "Search benchmark")."""
    from search.cli import main

    assert main(["curves", "signals", str(REPO / "results" / "curves" / "quickstart.jsonl"), "--boot", "200",
                 "--json"]) == 0
    t = json.loads(capsys.readouterr().out)["quickstart"]
    early, later = t["signals"]["objective"]["0.1"], t["signals"]["objective"]["0.25"]
    assert t["used"] == 200 and early["ci95"][1] < 0 < later["ci95"][0], t
    assert main(["curves", "signals", str(REPO / "results" / "curves" / "quickstart.jsonl"), "--boot", "200",
                 "--markdown"]) == 0
    md = capsys.readouterr().out
    assert f"| objective | {early['spearman']:+.2f} [" in md and "**quickstart** (200 curves" in md


@pytest.mark.parametrize("name,every", [("paper5x10", 1000), ("strings3x5", 1800), ("onehot5x5", 1500)])
def test_the_recorded_tables_of_other_tasks_are_complete_and_match_their_shipped_search(name, every):
    """The committed tables of issue #26 were recorded from their shipped search config (so the benchmark's
    methods take that config's settings for them), complete: 60 configurations x 2 seeds, every curve evaluated
    to the full budget with the memory signal."""
    path = REPO / "results" / "curves" / f"{name}.jsonl"
    head, curves = read_table(path)
    shipped = load_search_config(str(REPO / "configs" / "search" / f"{name}.yaml"),
                                 [f"overrides.train.eval_every={every}"])
    assert head["name"] == name and head["search"]["name"] == name and head["eval_every"] == every
    assert head["max_episodes"] == shipped.max_episodes and head["base"]["task"] == shipped.base.task.to_dict()
    assert sorted((c["config_id"], c["seed"]) for c in curves) == [(i, s) for i in range(60) for s in range(2)]
    evals = shipped.max_episodes // every  # at the first batch boundary at or past each multiple of every
    batch = shipped.base.train.batch_size
    for c in curves:
        assert len(c["episodes"]) == len(c["read_entropy"]) == evals and not c["diverged"]
        assert c["episodes"][-1] == shipped.max_episodes
        assert all(0 <= e - k * every < batch for k, e in enumerate(c["episodes"], 1))
    points = draw_points(shipped, 60, 0)  # the draw is the shipped space's: a rerun goes on the same points
    assert all(c["point"] == points[c["config_id"]] for c in curves)


def test_the_click_level_does_not_depend_on_how_often_a_table_was_recorded():
    """The instruments take a curve's plateau from the schedulers' plateau span (10-30 % of the budget), so the
    same curves recorded every 5 % and every 10 % get the same click level and clicks (the first three recorded
    evaluations, the rule before, gave 5-15 % against 10-30 %: on a pre-click rise, a lower level and earlier
    clicks for the finer recording)."""
    from search.bench.signals import curve_plateau, signal_power

    def curve(k, every):
        eps = list(range(every, 101, every))
        rise = [min(0.2 + 0.01 * e, 0.45) for e in eps]  # 0.25 at 5 %, 0.3 at 10 % ... a slow pre-click rise
        vals = [v if e < 40 + 10 * k else 0.6 + 0.05 * k for e, v in zip(eps, rise)]  # curve k clicks at 40+10k %
        return {"episodes": eps, "objective": vals, "train_s": [1.0] * len(eps), "wall_s": 1.0}

    fine = [curve(k, 5) for k in range(4)]
    coarse = [curve(k, 10) for k in range(4)]
    assert curve_plateau(fine[0], 100) == pytest.approx(0.4) == curve_plateau(coarse[0], 100)  # the 20 % value
    a = signal_power(fine, 100, fractions=(0.25,), n_boot=50)
    b = signal_power(coarse, 100, fractions=(0.25,), n_boot=50)
    assert a["click_level"] == b["click_level"] == pytest.approx(0.4 + 0.25 * (0.75 - 0.4))
    assert a["shape"]["click_at_quartiles"] == b["shape"]["click_at_quartiles"]
    # the first three recorded values' median (the old rule) would have put the fine table's plateau at 0.3
    assert float(np.median(fine[0]["objective"][:3])) == pytest.approx(0.3)


def test_signals_of_a_minimised_objective_are_those_of_its_negation(tmp_path):
    """A table whose objective is minimised (header ``objective.mode: min``, e.g. a loss) is read negated: the
    same curves stored as 1 - accuracy with mode min give the same clicks, shape and signal ranks as the
    accuracy table, and the report says the objective was negated."""
    from search.bench.signals import table_signals

    src = REPO / "tests" / "data" / "curves-tiny.jsonl"
    lines = src.read_text().splitlines()
    head = json.loads(lines[0])
    head["objective"] = {**head["objective"], "mode": "min"}
    head["search"]["objectives"][0]["mode"] = "min"  # the header's objective is its search's primary one
    rows = [json.loads(x) for x in lines[1:]]
    for r in rows:
        r["objective"] = [None if v is None else 1.0 - v for v in r["objective"]]
    flipped = tmp_path / "tiny-min.jsonl"
    flipped.write_text("\n".join(json.dumps(x) for x in [head, *rows]) + "\n")
    a, b = table_signals([str(src)], n_boot=50)["tiny"], table_signals([str(flipped)], n_boot=50)["tiny"]
    assert not a["objective_negated"] and b["objective_negated"]
    assert b["clicked"] == a["clicked"] and b["click_level"] == pytest.approx(a["click_level"] - 1.0, abs=1e-3)
    assert b["shape"]["click_at_quartiles"] == a["shape"]["click_at_quartiles"]
    assert b["shape"]["click_time_vs_final"] == a["shape"]["click_time_vs_final"]
    for f, per in a["signals"]["objective"].items():
        assert b["signals"]["objective"][f]["spearman"] == per["spearman"]
        assert b["signals"]["objective"][f]["auroc_click"] == per["auroc_click"]


def _tiny(tmp_path, name: str, edit_head=None, edit_rows=None):
    """tests/data/curves-tiny.jsonl (12 real curves, 6 configurations) rewritten by ``edit_head(head)`` and
    ``edit_rows(rows)`` into ``tmp_path / name``."""
    lines = (REPO / "tests" / "data" / "curves-tiny.jsonl").read_text().splitlines()
    head, rows = json.loads(lines[0]), [json.loads(x) for x in lines[1:]]
    if edit_head:
        edit_head(head)
    if edit_rows:
        edit_rows(rows)
    out = tmp_path / name
    out.write_text("\n".join(json.dumps(x) for x in [head, *rows]) + "\n")
    return out


def _set(rows, k, key, value):
    rows[k] = {**rows[k], key: value}


@pytest.mark.parametrize("why,edit_head,edit_rows,message", [
    ("a column shorter than the episodes", None,
     lambda rows: _set(rows, 2, "objective", rows[2]["objective"][:-1]),
     r"t.jsonl:4: objective has 19 entries for 20 evaluations"),
    ("a training-time column shorter", None, lambda rows: _set(rows, 0, "train_s", rows[0]["train_s"][:5]),
     r"t.jsonl:2: train_s has 5 entries"),
    ("objective values as strings", None, lambda rows: _set(rows, 1, "objective", [str(v) for v in rows[1]["objective"]]),
     r"t.jsonl:3: objective values must be numbers"),
    ("an empty curve", None, lambda rows: _set(rows, 1, "episodes", []), r"t.jsonl:3: episodes must be a non-empty"),
    ("episodes out of order", None, lambda rows: _set(rows, 1, "episodes", rows[1]["episodes"][::-1]),
     r"t.jsonl:3: episodes must increase"),
    ("a header objective its search does not have", lambda h: h["objective"].update(mode="min"), None,
     r"header's objective \(val/acc_2plus, min\) is not its search's primary objective \(val/acc_2plus, max\)"),
    ("a misspelt mode", lambda h: h["objective"].update(mode="minimize"), None,
     r"header's objective must be .*got .*minimize"),
    ("curves longer than the header's budget", None,
     lambda rows: [_set(rows, k, "episodes", [10 * e for e in r["episodes"]]) for k, r in enumerate(rows)],
     r"t.jsonl:2 \(configuration 0, seed 0\): evaluated at 300000 episodes, past the search's budget of 30000"),
    ("a cut curve not marked diverged", None,
     lambda rows: _set(rows, 3, "episodes", rows[3]["episodes"][:8]) or [
         _set(rows, 3, c, rows[3][c][:8]) for c in ("objective", "train_s", "acc_by_instance", "val_loss",
                                                      "train_loss", "read_entropy") if rows[3].get(c)],
     r"t.jsonl:5 \(configuration \d+, seed \d\): ends at 12000 episodes, before the budget of 30000, and is not "
     r"marked diverged"),
    ("a point outside its choices", None,
     lambda rows: _set(rows, 4, "point", {**rows[4]["point"], "model.memory.width": 7}),
     r"t.jsonl:6 .*model.memory.width = 7 is not one of its choices"),
    ("a point outside its range", None,
     lambda rows: _set(rows, 4, "point", {**rows[4]["point"], "train.lr": 5.0}),
     r"t.jsonl:6 .*train.lr = 5.0 is outside its range"),
    ("a point of another space", None,
     lambda rows: _set(rows, 4, "point", {**rows[4]["point"], "model.memory.heads": 2}),
     r"t.jsonl:6 .*point sets model.memory.heads, which is not in the search's space"),
    ("a flat table", None,
     lambda rows: [_set(rows, k, "objective", [0.2] * len(r["objective"])) for k, r in enumerate(rows)],
     r"every configuration ends at the same val/acc_2plus \(0.2\): there is nothing for a search to find"),
])
def test_a_table_that_contradicts_itself_is_refused_naming_the_file_line_and_column(tmp_path, why, edit_head,
                                                                                      edit_rows, message):
    """Both readers of a table (the benchmark's ``load_table`` and ``mann-search curves signals``) check its curves
    against their format and its header (objective, budget, space) and name the culprit, where a table of
    another task, edited or converted by hand, would otherwise give figures that cannot be right."""
    from search.bench.signals import table_signals
    from search.bench.table import load_table

    bad = _tiny(tmp_path, "t.jsonl", edit_head, edit_rows)
    with pytest.raises(ConfigError, match=message):
        load_table(bad)
    with pytest.raises(ConfigError, match=message):
        table_signals([str(bad)], n_boot=10)


def test_a_diverged_curve_of_a_minimised_objective_counts_as_its_worst(tmp_path):
    """A curve that diverged counts as the worst value it reached, in the objective's own direction: for a loss
    (mode min) its largest, not its smallest (which made a diverged configuration the table's best); one without
    any finite value counts as the table's worst. The same curves as accuracy (max) and as 1 - accuracy (min),
    with a configuration diverged, give the same table."""
    from search.bench.table import load_table

    def diverge(rows):
        for k in (0, 1):  # configuration 0, both seeds: NaN (null) from the 4th evaluation on, then none at all
            rows[k]["diverged"] = True
            rows[k]["objective"] = rows[k]["objective"][:3] + [None] * (len(rows[k]["objective"]) - 3)
        rows[1]["objective"] = [None] * len(rows[1]["objective"])

    def to_min(head):
        head["objective"]["mode"] = head["search"]["objectives"][0]["mode"] = "min"

    def min_rows(rows):
        diverge(rows)
        for r in rows:
            r["objective"] = [None if v is None else 1.0 - v for v in r["objective"]]

    a = load_table(_tiny(tmp_path, "max.jsonl", None, diverge))
    b = load_table(_tiny(tmp_path, "min.jsonl", to_min, min_rows))
    assert b.sign == -1.0 and a.sign == 1.0
    np.testing.assert_allclose(b.value, a.value - 1.0, atol=1e-9)  # 1 - v negated: v - 1, larger = better
    seed0 = json.loads((REPO / "tests" / "data" / "curves-tiny.jsonl").read_text().splitlines()[1])
    assert a.value[0] == a.value.min()  # the diverged configuration is the table's worst, in both directions
    # seed 0 at the worst of its 3 finite values, seed 1 (nothing finite) at the table's worst curve
    assert a.value[0] <= min(seed0["objective"][:3])


def test_signals_of_a_table_with_unflagged_non_finite_values_are_valid_json(tmp_path):
    """A curve with NaN (or null) values not marked diverged is left out of the signals (it has no final value),
    and the report is valid JSON (no NaN) in both formats."""
    from search.bench.signals import format_report, table_signals

    def nan(rows):
        rows[2]["objective"] = rows[2]["objective"][:-1] + [float("nan")]

    report = table_signals([str(_tiny(tmp_path, "nan.jsonl", None, nan))], n_boot=10)["tiny"]
    assert report["used"] == report["curves"] - 1
    json.dumps(report, allow_nan=False)
    assert "tiny:" in format_report({"tiny": report})
