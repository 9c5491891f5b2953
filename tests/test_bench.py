"""`mann bench` runs, with its comparisons (that the plain port computes what the model computes:
tests/test_conformance.py)."""

from __future__ import annotations

import json

import pytest

from mann.bench.plain import PlainMANN
from mann.config import ControllerConfig, MemoryConfig, ModelConfig
from mann.model import MANN

from .test_cli import mann


def test_plain_port_needs_an_lstm_controlled_mann():
    cfg = ModelConfig(kind="mann", controller=ControllerConfig(kind="feedforward", hidden=4),
                      memory=MemoryConfig(slots=4, width=2, read_heads=1))
    with pytest.raises(ValueError, match="LSTM controller"):
        PlainMANN.from_model(MANN(cfg, input_size=3, output_size=2))


def test_bench_compare_times_two_configs_interleaved(omniglot_dir, capsys):
    """``--compare`` (mann/cli.py forwards it as ``args.compare``): a KEY=VALUE override, and another config."""
    from mann.bench import run_bench
    from mann.cli import build_parser

    args = build_parser().parse_args(["bench", "--config", "configs/mann/smoke.yaml", "--steps", "1", "--repeats",
                                      "2", "--warmup", "0", "--json"])
    for compare, config in ((["model.fused_memory=false"], "configs/mann/smoke.yaml"),
                            (["configs/mann/small.yaml", "task.instances=2"], "configs/mann/small.yaml")):
        args.compare = compare
        assert run_bench(args) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["compare"] == compare and out["compare_config"] == config
        assert out["compare_episodes_per_s"] > 0 and out["speedup_vs_compare"] > 0
        lo, hi = out["compare_speedup_range"]
        assert lo <= out["speedup_vs_compare"] <= hi


def test_bench_json(omniglot_dir):
    proc = mann("bench", "--config", "configs/mann/smoke.yaml", "--steps", "2", "--repeats", "2", "--warmup", "1",
                "--compare-plain", "--compare-prefetch", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["episodes_per_s"] > 0 and out["plain_episodes_per_s"] > 0 and out["batch_size"] == 16
    assert out["device"] == "cpu" and out["threads"] >= 1 and out["speedup_vs_plain"] > 0
    lo, hi = out["speedup_range"]
    assert lo <= out["speedup_vs_plain"] <= hi
    assert out["loop_inline_episodes_per_s"] > 0 and out["loop_prefetch_episodes_per_s"] > 0
    lo, hi = out["prefetch_speedup_range"]
    assert lo <= out["prefetch_speedup"] <= hi
