"""Gradient norms of the training loss on fresh training batches, for a checkpoint or a fresh model.

    python scripts/grad_norms.py --config configs/mann/strings5.yaml [--checkpoint runs/x/checkpoint.pt] \
        [--batches 20] [--set KEY=VALUE ...]

Prints one JSON line: the total gradient norm (what train.grad_clip compares with) under the mean and the sum of
the five characters' cross-entropies, and the fraction of batches each would clip. Adam is invariant to the scale
of the loss, so where neither clips, the two losses train the same model (up to Adam's epsilon).
"""

from __future__ import annotations

import argparse
import json

import torch

from mann.config import load_train_config
from mann.model import build_model, episode_loss
from mann.train import load_checkpoint, load_splits, make_sampler


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--checkpoint")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    cfg = load_train_config(args.config, args.set)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.task, cfg.data.image_size)
    if args.checkpoint:
        model.load_state_dict(load_checkpoint(args.checkpoint)["model"])
    sampler = make_sampler(load_splits(cfg.data), "train", cfg)
    g = torch.Generator().manual_seed(99)
    norms = []
    for _ in range(args.batches):
        ep = sampler.sample(cfg.train.batch_size, g)
        model.zero_grad(set_to_none=True)
        episode_loss(model(ep.inputs), ep.labels, cfg.task, "mean").backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))))
    clip = cfg.train.grad_clip or float("inf")
    scale = 5.0 if cfg.task.labels == "string" else 1.0
    t = torch.tensor(norms)
    print(json.dumps({
        "checkpoint": args.checkpoint, "batches": args.batches, "grad_clip": cfg.train.grad_clip,
        "norm_mean_loss": {"median": float(t.median()), "max": float(t.max())},
        "norm_sum_loss": {"median": float(t.median() * scale), "max": float(t.max() * scale)},
        "clipped_fraction_mean_loss": float((t > clip).float().mean()),
        "clipped_fraction_sum_loss": float((t * scale > clip).float().mean()),
    }))


if __name__ == "__main__":
    main()
