"""A stress table for the search benchmark: a recorded curves table (``mann-search curves record``) with every
curve delayed (or advanced) by a share of its evaluations, as a task whose MANN clicks later (earlier) would be. A
benchmark instrument over recorded curves, not a recording: delayed (``--by`` > 0), each curve's first value is
held for the first ``--by`` share of its evaluations and its recorded values follow, cut at the budget (so a late
clicker also ends lower, as a truncated run does); advanced (``--by`` < 0), the first ``-by`` share of its
evaluations is dropped and its last value held to the budget (a plateau: no gain from the extra training, which
understates an early clicker). Episodes and training times stay as recorded. Every per-evaluation series shifts
the same way.

    python scripts/shift_curves.py results/curves/quickstart.jsonl --by 0.3 --out /tmp/quickstart-shift30.jsonl
    python scripts/shift_curves.py results/curves/quickstart.jsonl --by -0.3 --out /tmp/quickstart-shift-30.jsonl

The table keeps its search (header) and is named ``<name>-shift<percent>`` (``-shift-30`` when advanced)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SERIES = ("objective", "acc_by_instance", "val_loss", "train_loss", "read_entropy")


def shift_row(row: dict, by: float) -> dict:
    n = len(row["episodes"])
    k = int(round(by * n))
    out = dict(row)
    for key in SERIES:
        if isinstance(row.get(key), list) and len(row[key]) == n:
            out[key] = [row[key][min(n - 1, max(0, i - k))] for i in range(n)]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("table")
    p.add_argument("--by", type=float, required=True, help="share of each curve's evaluations to delay it by")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if not (0 < abs(a.by) < 1):
        print(f"--by: a share of the evaluations in (-1, 0) or (0, 1), got {a.by}", file=sys.stderr)
        return 2
    lines = Path(a.table).read_text().splitlines()
    head = json.loads(lines[0])
    head["name"] = f"{head.get('name') or Path(a.table).stem}-shift{round(100 * a.by)}"
    rows = [json.dumps(shift_row(json.loads(x), a.by)) for x in lines[1:] if x.strip()]
    Path(a.out).write_text("\n".join([json.dumps(head), *rows]) + "\n")
    how = "delayed" if a.by > 0 else "advanced"
    print(f"{a.out}: {len(rows)} curves of {head['name']}, {how} by {abs(a.by):.0%} of their evaluations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
