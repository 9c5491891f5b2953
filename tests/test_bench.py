"""The benchmark's plain port computes exactly what the model computes; `mann bench` runs."""

from __future__ import annotations

import json

import torch

from mann.bench.plain import PlainMANN
from mann.config import ControllerConfig, MemoryConfig, ModelConfig
from mann.model import MANN

from .test_cli import mann


def test_plain_port_matches_model_forward_and_gradients():
    torch.manual_seed(0)
    cfg = ModelConfig(controller=ControllerConfig(hidden=24), memory=MemoryConfig(slots=12, width=5, read_heads=3))
    model = MANN(cfg, input_size=30, output_size=5)
    plain = PlainMANN.from_model(model)
    x = torch.rand(4, 20, 30)
    y = torch.randint(0, 5, (4, 20))
    out_m, out_p = model(x), plain(x)
    torch.testing.assert_close(out_m, out_p, atol=1e-5, rtol=1e-4)
    torch.nn.functional.cross_entropy(out_m.reshape(-1, 5), y.reshape(-1)).backward()
    torch.nn.functional.cross_entropy(out_p.reshape(-1, 5), y.reshape(-1)).backward()
    RW = 15
    g_ih = torch.cat([model.input_proj.weight.grad, model.recurrent.weight.grad[:, :RW]], 1)
    torch.testing.assert_close(plain.cell.weight_ih.grad, g_ih, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(plain.cell.weight_hh.grad, model.recurrent.weight.grad[:, RW:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(plain.head.weight.grad, model.head.weight.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(plain.output.weight.grad, model.output.weight.grad, atol=1e-5, rtol=1e-4)


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
