"""The recorded reproduction (results/*.json, README's results table) is what the committed checkpoint gives."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import BIN, REPO

RESULTS = REPO / "results"
ROWS = sorted(RESULTS.glob("*.json"))
REQUIRED = {"name", "paper_row", "command", "evaluate", "seed", "git_commit", "episodes_trained", "wall_s",
            "machine", "config", "test", "curve", "finished"}


def _paper_results():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import paper_results
    finally:
        sys.path.pop(0)
    return paper_results


def test_results_are_recorded():
    assert ROWS, "results/*.json missing (scripts/paper_results.py record)"
    assert (RESULTS / "accuracy_by_instance.png").is_file() and (RESULTS / "learning_curves.png").is_file()


@pytest.mark.parametrize("path", ROWS, ids=[p.stem for p in ROWS])
def test_each_row_is_complete_and_in_the_readme(path):
    row = json.loads(path.read_text())
    assert REQUIRED <= set(row), REQUIRED - set(row)
    assert row["test"]["split"] == "test" and row["test"]["episodes"] >= 1000
    assert row["command"].startswith("mann train --config configs/mann/")
    assert _paper_results().table_line(row) in (REPO / "README.md").read_text(), "README's table is out of date"


def test_wall_time_adds_up_the_legs_of_a_resumed_run():
    def line(train, data=1.0):
        return {"time/data_s": data, "time/train_s": train, "time/eval_s": 2.0, "time/checkpoint_s": 0.5}

    run_wall = _paper_results().run_wall
    assert run_wall([line(10.0), line(20.0)]) == 23.5  # one leg: its last totals
    # resumed by a process that started its totals again at 0: 23.5 (first leg) + 1 + 15 + 2 + 0.5
    assert run_wall([line(10.0), line(20.0), line(5.0), line(15.0)]) == 23.5 + 18.5
    assert run_wall([]) == 0.0


def test_committed_checkpoint_reproduces_its_row(omniglot_dir):
    """`mann evaluate` on the small committed checkpoint gives the recorded MANN row (same episodes and seed)."""
    exported = [json.loads(p.read_text()) for p in ROWS]
    exported = [r for r in exported if r["evaluate"].split("--checkpoint ")[1].split()[0].startswith("results/")]
    assert exported, "no row has a committed checkpoint under results/"
    for row in exported:
        checkpoint = REPO / row["evaluate"].split("--checkpoint ")[1].split()[0]
        assert checkpoint.stat().st_size < 8 * 2**20, f"{checkpoint} is too large to commit"
        args = row["evaluate"].split()[1:]
        out = subprocess.run([str(BIN / "mann"), *args], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        got = json.loads(out.stdout)
        want = row["test"]
        assert got["trained_episodes"] == row["episodes_trained"]
        for k, acc in want["accuracy_by_instance"].items():
            assert abs(got["accuracy_by_instance"][k] - acc) <= want["ci95_by_instance"][k], (k, got, want)
