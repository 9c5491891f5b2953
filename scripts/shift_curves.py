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

The table keeps its search (header) and is named ``<name>-shift<percent>`` (``-shift-30`` when advanced).

``--smooth P`` instead takes the click away: each curve's objective is replaced by a smooth rise from its first to
its last recorded value, ``first + (last - first) * ((i + 1) / n) ** P`` at its i-th of n evaluations (P 0.5: a
square-root rise; smaller P rises sooner and flattens), as a task whose curves rise without sitting at chance
would; every other series stays as recorded, and so does a curve with a missing or non-finite value. The table
is named ``<name>-smooth<100 P>``.

    python scripts/shift_curves.py results/curves/quickstart.jsonl --smooth 0.5 --out /tmp/quickstart-smooth50.jsonl

``--by-rank BY`` turns the click's usual order round: each curve is delayed (as ``--by``) by ``BY`` x the quantile
of its final value among the table's curves, so the curves that end highest click latest (cut at the budget,
they also end lower than recorded). Named ``<name>-rank<percent>``.

    python scripts/shift_curves.py results/curves/quickstart.jsonl --by-rank 0.4 --out /tmp/quickstart-rank40.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
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


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def smooth_row(row: dict, power: float) -> dict:
    obj = row.get("objective")
    if not isinstance(obj, list) or len(obj) < 2 or not all(_finite(v) for v in obj):
        return row
    n, first, last = len(obj), obj[0], obj[-1]
    return {**row, "objective": [first + (last - first) * ((i + 1) / n) ** power for i in range(n)]}


def final_quantiles(rows: list[dict]) -> list[float]:
    """Per curve: the quantile (0 lowest, 1 highest) of its final objective among the rows (a missing or
    non-finite final counts lowest; ties keep the rows' order)."""
    def final(r):
        obj = r.get("objective") or []
        return obj[-1] if obj and _finite(obj[-1]) else -math.inf

    order = sorted(range(len(rows)), key=lambda i: final(rows[i]))
    q = [0.0] * len(rows)
    for k, i in enumerate(order):
        q[i] = k / max(1, len(rows) - 1)
    return q


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("table")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--by", type=float, help="share of each curve's evaluations to delay it by")
    how.add_argument("--smooth", type=float, metavar="P", help="replace each curve's objective by a rise ** P")
    how.add_argument("--by-rank", type=float, metavar="BY", help="delay each curve by BY x its final's quantile")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.by is not None and not (0 < abs(a.by) < 1):
        print(f"--by: a share of the evaluations in (-1, 0) or (0, 1), got {a.by}", file=sys.stderr)
        return 2
    if a.by_rank is not None and not (0 < a.by_rank < 1):
        print(f"--by-rank: a share of the evaluations in (0, 1), got {a.by_rank}", file=sys.stderr)
        return 2
    if a.smooth is not None and not (0 < a.smooth <= 4):
        print(f"--smooth: a power in (0, 4], got {a.smooth}", file=sys.stderr)
        return 2
    lines = Path(a.table).read_text().splitlines()
    head = json.loads(lines[0])
    name = head.get("name") or Path(a.table).stem
    if a.by_rank is not None:
        head["name"] = f"{name}-rank{round(100 * a.by_rank)}"
        rows = [json.loads(x) for x in lines[1:] if x.strip()]
        rows = [json.dumps(shift_row(r, a.by_rank * q)) for r, q in zip(rows, final_quantiles(rows))]
        said = f"each delayed by {a.by_rank:.0%} x its final's quantile of their evaluations (the best clicks last)"
    elif a.smooth is not None:
        head["name"] = f"{name}-smooth{round(100 * a.smooth)}"
        rows = [json.dumps(smooth_row(json.loads(x), a.smooth)) for x in lines[1:] if x.strip()]
        said = f"each objective a rise ** {a.smooth:g} from its first to its last value"
    else:
        head["name"] = f"{name}-shift{round(100 * a.by)}"
        rows = [json.dumps(shift_row(json.loads(x), a.by)) for x in lines[1:] if x.strip()]
        said = f"{'delayed' if a.by > 0 else 'advanced'} by {abs(a.by):.0%} of their evaluations"
    Path(a.out).write_text("\n".join([json.dumps(head), *rows]) + "\n")
    print(f"{a.out}: {len(rows)} curves of {head['name']}, {said}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
