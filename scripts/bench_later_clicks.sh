#!/usr/bin/env bash
# The later-click stress test of freeze_thaw (docs/freeze-thaw.md, "Later clicks"): each recorded table delayed by 30 % of its
# evaluations (scripts/shift_curves.py), then the benchmark of TPE + freeze_thaw against the baseline on it, with
# the first horizon's escalation (the default) and without it (escalate_after so large it never acts). Each table
# takes its own shipped config's ASHA and reporting settings, freeze_thaw a grace of 15 % of the budget as on the
# recorded tables. Figures: OUT/<table>-{new,old}.json (default OUT: docs/benchmark-later-clicks).
# BY (default 0.3): the share of the evaluations to shift by; negative: earlier clicks (each curve advanced, its
# last value held; escalation on only, as it never acts before the first horizon). Example, earlier clicks:
#   scripts/bench_later_clicks.sh docs/benchmark-earlier-clicks 100 -0.3
# BENCH_ARGS: more benchmark arguments, e.g. cluster.yaml's study shape, escalation on only (MODES=new):
#   MODES=new BENCH_ARGS="--num-samples 64 --max-concurrent 32" scripts/bench_later_clicks.sh OUT 100 0.3
# BY smoothP (e.g. smooth0.5): no click at all, each curve's objective a smooth rise ** P from its first to its last
# value (scripts/shift_curves.py --smooth; escalation on only), with random search beside freeze_thaw:
#   scripts/bench_later_clicks.sh docs/benchmark-smooth 100 smooth0.5
# BY rankR (e.g. rank0.4): each curve delayed by R x the quantile of its final value, the best clicking last
# (scripts/shift_curves.py --by-rank; escalation on only), random search beside:
#   scripts/bench_later_clicks.sh docs/benchmark-rank40 100 rank0.4
# Usage: scripts/bench_later_clicks.sh [OUT] [REPEATS] [BY]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/benchmark-later-clicks}
repeats=${2:-100}
by=${3:-0.3}
read -r -a modes <<< "${MODES:-new old}"
[[ $by == -* || $by == smooth* || $by == rank* ]] && modes=(new)
read -r -a bench_args <<< "${BENCH_ARGS:-}"
case $by in  # the kind of stress table and its value
  smooth*) kind=smooth; value=${by#smooth}; how=(--smooth "$value") ;;
  rank*) kind=rank; value=${by#rank}; how=(--by-rank "$value") ;;
  *) kind=shift; value=$by; how=(--by "$value") ;;
esac
tag=$kind$(python3 -c "import sys; print(round(100 * float(sys.argv[1])))" "$value")
methods=(tpe+freeze_thaw)
[[ $kind == shift ]] || methods+=(random)
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for t in quickstart paper5x10 strings3x5 onehot5x5; do
  .venv/bin/python scripts/shift_curves.py "results/curves/$t.jsonl" "${how[@]}" --out "$tmp/$t-$tag.jsonl"
  grace=$(.venv/bin/python -c "import json, sys; h = json.loads(open(sys.argv[1]).readline()); \
print(round(0.15 * h['search']['overrides']['train.episodes']))" "$tmp/$t-$tag.jsonl")
  for mode in "${modes[@]}"; do
    extra=()
    [[ $mode == old ]] && extra=(--set scheduler.freeze_thaw.escalate_after=1000000)
    echo "== $t-$tag, escalation $([[ $mode == new ]] && echo on || echo off)"
    .venv/bin/mann-search benchmark --curves "$tmp/$t-$tag.jsonl" --config "configs/search/$t.yaml" \
      --set scheduler.kind=freeze_thaw --set scheduler.grace_episodes="$grace" "${extra[@]}" "${bench_args[@]}" \
      --methods "${methods[@]}" --repeats "$repeats" --markdown --save "$out/$t-$mode.json" --plot "$tmp/$t-$mode.png"
  done
done
