"""Accuracy by instance of a model that knows which labels the episode has shown so far but not which image
goes with which: it names one of the labels seen so far, uniformly (1 / number of distinct labels seen), and
cannot name a label before it is shown (0 at the 1st instance). With string labels this is the level a MANN
reaches once it can reproduce whole seen labels, before it binds images to them.

    python scripts/seen_label_baseline.py --set task.classes=5 [--set task.sampling=random --set task.steps=50]
"""

from __future__ import annotations

import argparse
import json

import torch

from mann.config import load_train_config
from mann.episodes import EpisodeSampler
from mann.train import mean_ci95


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--episodes", type=int, default=4000)
    args = p.parse_args()
    task = load_train_config(None, ["task.labels=string"] + args.set).task
    pool = torch.zeros(max(task.classes, 30), 20, 4, 4, dtype=torch.uint8)
    ep = EpisodeSampler(pool, task).sample(args.episodes, torch.Generator().manual_seed(0))
    C, T, K = task.classes, task.length, task.instances
    first = ep.instance == 1  # (B, T) a new label appears at this step
    seen_before = first.long().cumsum(1) - first.long()  # distinct labels shown before step t
    guess = torch.where(first, torch.zeros(ep.labels.shape), 1.0 / seen_before.clamp_min(1).float())
    onehot = torch.nn.functional.one_hot((ep.instance - 1).clamp(max=K - 1), K).float()
    onehot = onehot * (ep.instance <= K).float().unsqueeze(-1)
    count = onehot.sum(1)
    acc = torch.where(count > 0, (guess.unsqueeze(-1) * onehot).sum(1) / count.clamp_min(1), float("nan"))
    mean, _ = mean_ci95(acc)
    print(json.dumps({"classes": C, "steps": T, "sampling": task.sampling,
                      "accuracy_by_instance": [round(100 * float(m), 1) for m in mean]}))


if __name__ == "__main__":
    main()
