"""`mann` CLI end to end (subprocesses): train, evaluate --json, data check, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .test_config import REPO


def mann(*args, env=None, timeout=300):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "mann.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=full_env)


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_smoke_config_trains_and_evaluates(tmp_path, omniglot_dir):
    out = tmp_path / "run"
    proc = mann("train", "--config", "configs/mann/smoke.yaml", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "acc by instance" in proc.stdout and (out / "checkpoint.pt").exists()
    proc = mann("evaluate", "--checkpoint", str(out), "--split", "test", "--episodes", "50", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["split"] == "test" and result["episodes"] == 50
    assert set(result["accuracy_by_instance"]) == {"1", "2", "3", "4"}
    assert all(0.0 <= v <= 1.0 for v in result["accuracy_by_instance"].values())
    table = mann("evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--episodes", "20")
    assert table.returncode == 0 and "1st" in table.stdout and "±" in table.stdout


def test_data_check(omniglot_dir):
    proc = mann("data", "check", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["characters"] == 1623 and info["split"] == {
        "train": 1100, "val": 100, "test": 423, "train_classes_with_rotations": 4400}


@pytest.mark.parametrize(
    "args,needles",
    [
        (["train", "--config", "configs/mann/nope.yaml"], ["nope.yaml", "not found"]),
        (["train", "--config", "configs/mann/smoke.yaml", "--set", "model.memory.slotz=4"], ["model.memory.slotz"]),
        (["train", "--config", "configs/mann/smoke.yaml", "--set", "train.lr=fast"], ["train.lr"]),
        (["train", "--config", "configs/mann/smoke.yaml", "--set", "oops"], ["oops", "KEY.PATH=VALUE"]),
        (["train", "--config", "configs/mann/smoke.yaml", "--set", "data.val_characters=0"],
         ["data.val_characters: must be >= 1 to train"]),
        (["evaluate", "--checkpoint", "/nonexistent/ckpt.pt"], ["/nonexistent/ckpt.pt"]),
        (["evaluate", "--checkpoint", "x", "--episodes", "0"], ["--episodes"]),
        (["evaluate", "--checkpoint", "x", "--split", "dev"], ["--split"]),
        (["frobnicate"], ["frobnicate"]),
        (["data", "check", "--data-dir", "/nonexistent/omniglot"], ["/nonexistent/omniglot", "does not exist"]),
        (["data", "check", "--image-size", "200"], ["--image-size: must be in [4, 105], got 200"]),
        (["train", "--config", "configs/mann/smoke.yaml", "--out", "README.md"],
         ["--out README.md: exists and is not a folder"]),  # refused before any training
    ],
)
def test_bad_input_is_one_clear_line(args, needles):
    assert_one_line_error(mann(*args), *needles)


def test_missing_data_setting_is_named(tmp_path):
    env = {"MANN_DATA_DIR": ""}
    proc = mann("train", "--config", "configs/mann/smoke.yaml", "--out", str(tmp_path), env=env)
    assert_one_line_error(proc, "data.data_dir", "MANN_DATA_DIR")


@pytest.mark.parametrize("how", ["env", "set"])
def test_wrong_data_directory_names_its_setting_before_training(tmp_path, how):
    """A data directory that does not exist, or holds no Omniglot, is refused by the setting it came from, before
    the run's start line (nothing is created in --out)."""
    missing, empty = tmp_path / "nope", tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "run"
    for folder, needle in ((missing, "data directory does not exist"), (empty, "no Omniglot found")):
        if how == "env":
            proc = mann("train", "--config", "configs/mann/smoke.yaml", "--out", str(out),
                        env={"MANN_DATA_DIR": str(folder)})
            origin = "(from MANN_DATA_DIR)"
        else:
            proc = mann("train", "--config", "configs/mann/smoke.yaml", "--out", str(out),
                        "--set", f"data.data_dir={folder}")
            origin = "(from data.data_dir)"
        assert_one_line_error(proc, str(folder), needle, origin)
        assert proc.stdout == "" and not out.exists(), proc.stdout
    proc = mann("data", "check", "--data-dir", str(missing))
    assert_one_line_error(proc, str(missing), "(from --data-dir)")
    proc = mann("evaluate", "--checkpoint", "results/mann_paper.pt", "--data-dir", str(missing), "--episodes", "2")
    assert_one_line_error(proc, str(missing), "(from --data-dir)")


def test_empty_config_file_is_named(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# only a comment\n")
    proc = mann("train", "--config", str(empty), "--out", str(tmp_path / "run"))
    assert_one_line_error(proc, "empty.yaml", "empty config file")
    assert not (tmp_path / "run").exists()


def test_corrupt_checkpoint_is_named(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert_one_line_error(mann("evaluate", "--checkpoint", str(bad)), "bad.pt", "not a readable mann checkpoint")
