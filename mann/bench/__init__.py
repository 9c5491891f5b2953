"""`mann bench`: time training steps (forward + backward + optimizer) and episode sampling.

Medians over repeats after warm-up; with ``--compare-plain`` the plain port (``mann.bench.plain``) is timed in
the same process, interleaved with the model (each repeat times both, back to back), and the median of the
per-repeat ratios printed with their range. ``--compare SPEC`` (repeatable) does the same for a second model: SPEC
is another config file, or a ``KEY.PATH=VALUE`` override of the bench's config (``model.fused_memory=false``
times the readable path against the fused one). ``--compare-prefetch`` times whole loops the same way, a fresh batch
every step, sampled in the loop or ahead on the training loop's background thread.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from ..config import load_train_config, replace
from ..model import build_model, episode_loss
from ..train import Prefetcher, load_splits, make_optimizer, make_sampler

PAPER = Path(__file__).resolve().parents[2] / "configs" / "mann" / "paper.yaml"


def _step(model, optimizer, ep, task, clip) -> None:
    loss = episode_loss(model(ep.inputs), ep.labels, task)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()


def _time_steps(model, optimizer, batches, task, clip, steps: int) -> float:
    """Seconds per training step, over ``steps`` steps cycling through ``batches``."""
    t0 = time.perf_counter()
    for i in range(steps):
        _step(model, optimizer, batches[i % len(batches)], task, clip)
    if batches[0].inputs.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def _time_loop(model, optimizer, sampler, g, cfg, device, steps: int, prefetch: bool) -> float:
    """Seconds per step of the training loop's pattern: a fresh batch every step, drawn in the loop or ahead
    on the background thread (:class:`mann.train.Prefetcher`)."""
    t0 = time.perf_counter()
    batches = Prefetcher(sampler, cfg.train.batch_size, g, steps, enabled=prefetch)
    try:
        for _ in range(steps):
            _step(model, optimizer, batches.take().to(device), cfg.task, cfg.train.grad_clip)
    finally:
        batches.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def _paired(slow: list[float], fast: list[float]) -> tuple[float, list[float]]:
    """Median and range of the per-repeat ratios: each repeat times both back to back, so the median of those
    paired ratios is robust to the machine's drift."""
    ratios = sorted(s / f for s, f in zip(slow, fast))
    return statistics.median(ratios), [ratios[0], ratios[-1]]


def _config(path, sets, batch_size):
    cfg = load_train_config(path, sets)
    if batch_size:
        cfg = replace(cfg, train=replace(cfg.train, batch_size=batch_size))
    return cfg


def _compare_config(args, specs: list[str]):
    """The second model of ``--compare``: the config files and ``KEY.PATH=VALUE`` overrides in ``specs``, on top of
    the bench's own config (``--config``, ``--set``)."""
    paths = [s for s in specs if "=" not in s]
    if len(paths) > 1:
        raise ValueError(f"--compare: at most one config file, got {paths}")
    path = paths[0] if paths else (args.config or PAPER)
    return str(path), _config(path, list(args.set) + [s for s in specs if "=" in s], args.batch_size)


def run_bench(args) -> int:
    cfg = _config(args.config or PAPER, args.set, args.batch_size)
    compare = list(getattr(args, "compare", None) or [])  # mann/cli.py: --compare (action append)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    B = cfg.train.batch_size
    splits = load_splits(cfg.data)
    sampler = make_sampler(splits, "train", cfg)
    g = torch.Generator().manual_seed(0)

    batches = [sampler.sample(B, g) for _ in range(4)]  # warm-up: first calls allocate
    t0 = time.perf_counter()
    n_sample = 20
    batches += [sampler.sample(B, g) for _ in range(n_sample)]
    sample_s = (time.perf_counter() - t0) / n_sample
    batches = [b.to(device) for b in batches[:8]]

    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.task, cfg.data.image_size).to(device)
    opt = make_optimizer(model, cfg.train)
    contenders = {"model": (model, opt, batches, cfg)}
    if args.compare_plain:
        from .plain import PlainMANN

        plain = PlainMANN.from_model(model).to(device)
        contenders["plain"] = (plain, make_optimizer(plain, cfg.train), batches, cfg)
    if compare:
        compare_path, c_cfg = _compare_config(args, compare)
        c_batches = batches
        if (c_cfg.data, c_cfg.task) != (cfg.data, cfg.task):  # another task: its own episodes
            c_sampler = make_sampler(load_splits(c_cfg.data), "train", c_cfg)
            c_batches = [c_sampler.sample(c_cfg.train.batch_size, g).to(device) for _ in range(8)]
        torch.manual_seed(0)
        c_model = build_model(c_cfg.model, c_cfg.task, c_cfg.data.image_size).to(device)
        contenders["compare"] = (c_model, make_optimizer(c_model, c_cfg.train), c_batches, c_cfg)
    for m, o, bs, c in contenders.values():
        if args.warmup:
            _time_steps(m, o, bs, c.task, c.train.grad_clip, args.warmup)
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(args.repeats):  # interleaved, so all see the same machine noise
        for name, (m, o, bs, c) in contenders.items():
            times[name].append(_time_steps(m, o, bs, c.task, c.train.grad_clip, args.steps))
    loops: dict[str, list[float]] = {"inline": [], "prefetch": []}
    for _ in range(args.repeats if args.compare_prefetch else 0):
        for name in loops:
            loops[name].append(_time_loop(model, opt, sampler, g, cfg, device, args.steps, name == "prefetch"))
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "config": str(args.config or PAPER),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch_size": B,
        "steps_per_episode": cfg.task.length,
        "median_step_s": med["model"],
        "episodes_per_s": B / med["model"],
        "sample_s_per_batch": sample_s,
        "sampling_vs_step": med["model"] / sample_s,
        "repeats": args.repeats,
        "steps_per_repeat": args.steps,
    }
    if "plain" in med:
        speedup, span = _paired(times["plain"], times["model"])
        out.update(plain_median_step_s=med["plain"], plain_episodes_per_s=B / med["plain"],
                   speedup_vs_plain=speedup, speedup_range=span)
    if "compare" in med:
        speedup, span = _paired(times["compare"], times["model"])
        out.update(compare=compare, compare_config=compare_path, compare_median_step_s=med["compare"],
                   compare_episodes_per_s=c_cfg.train.batch_size / med["compare"],
                   speedup_vs_compare=speedup, compare_speedup_range=span)
    if args.compare_prefetch:
        speedup, span = _paired(loops["inline"], loops["prefetch"])
        out.update(loop_inline_episodes_per_s=B / statistics.median(loops["inline"]),
                   loop_prefetch_episodes_per_s=B / statistics.median(loops["prefetch"]),
                   prefetch_speedup=speedup, prefetch_speedup_range=span)
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{out['config']}: batch {B}, {cfg.task.length} steps/episode, {out['device']}, {out['threads']} threads")
    print(f"model  {out['episodes_per_s']:8.1f} episodes/s  (median step {med['model'] * 1000:.1f} ms over "
          f"{args.repeats} x {args.steps} steps)")
    if "plain" in med:
        print(f"plain  {out['plain_episodes_per_s']:8.1f} episodes/s  (median step {med['plain'] * 1000:.1f} ms)")
        lo, hi = out["speedup_range"]
        print(f"speed-up vs plain port: {out['speedup_vs_plain']:.2f}x (median of {args.repeats} paired repeats; "
              f"range {lo:.2f}-{hi:.2f})")
    if "compare" in med:
        lo, hi = out["compare_speedup_range"]
        print(f"compare {out['compare_episodes_per_s']:7.1f} episodes/s  (median step {med['compare'] * 1000:.1f} ms; "
              f"{out['compare_config']} with {' '.join(compare)})")
        print(f"speed-up vs compare: {out['speedup_vs_compare']:.2f}x (median of {args.repeats} paired repeats; "
              f"range {lo:.2f}-{hi:.2f})")
    print(f"episode sampling {sample_s * 1000:.2f} ms per batch ({out['sampling_vs_step']:.0f}x faster than a step)")
    if args.compare_prefetch:
        lo, hi = out["prefetch_speedup_range"]
        print(f"training loop, a fresh batch each step: {out['loop_inline_episodes_per_s']:.1f} episodes/s sampling "
              f"in the loop, {out['loop_prefetch_episodes_per_s']:.1f} prefetched; {out['prefetch_speedup']:.2f}x "
              f"(median of {args.repeats} paired repeats; range {lo:.2f}-{hi:.2f})")
    return 0
