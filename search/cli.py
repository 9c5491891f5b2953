"""`mann-search run | resume | select | status | ui | replay | curves record | benchmark`.

Bad input (config, arguments, unreachable Ray or MLflow) exits with status 2 and one line naming the culprit.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from mann import metrics
from mann.cli import parser_class, positive_int, run_command

from .protocol import label_of

PROG = "mann-search"


def table(head: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> list[str]:
    """Rows as lines with aligned columns (numbers right-aligned)."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return [fmt(head).rstrip(), *(fmt(r).rstrip() for r in rows)]


def _print_outcome(outcome) -> None:
    study = outcome.study
    primary, split = study.primary, study.split
    rows = [t for t in outcome.trials if primary.metric in t["metrics"]]
    rows.sort(key=lambda t: t["metrics"][primary.metric], reverse=primary.mode == "max")
    print()
    took = f"; this leg took {outcome.wall_s:.0f} s" if outcome.resumed else f" in {outcome.wall_s:.0f} s"
    print(f"study {study.key}: {len(outcome.trials)} trials{took}")
    keys = list(study.search.config.space)
    head = ["#", primary.metric, metrics.EPISODES] + [k.split(".")[-1] for k in keys] + [f"{split} acc by instance (%)"]
    lines = []
    for i, t in enumerate(rows[:10], 1):
        m = t["metrics"]
        accs = " ".join(f"{a * 100:3.0f}" for a in metrics.by_instance(m, split))
        vals = [_fmt(t["config"].get(k, "-")) for k in keys]
        lines.append([str(i), f"{m[primary.metric]:.4f}", str(int(m.get(metrics.EPISODES, 0)))] + vals + [accs])
    for line in table(head, lines, right=set(range(3 + len(keys)))):
        print(line)
    if outcome.outcomes is not None:
        print(f"trials by outcome: {_counts(outcome.outcomes.values())}")
    if outcome.trial_wall_s > 0:
        share = 1 - outcome.train_s / outcome.trial_wall_s
        print(f"time in training steps: {outcome.train_s:.0f} s of {outcome.trial_wall_s:.0f} s trial time "
              f"(outside training steps: {share * 100:.1f} %)")
    if outcome.selection and "error" not in outcome.selection:
        s = outcome.selection
        prev = s["previous_champion"]
        was = "none" if prev is None else f"version {prev['version']}, {prev['score']:.4f}"
        print(f"selection: version {s['new_version']} of '{s['registered_model']}' "
              f"({label_of(s['new_trial'])}), test acc 2nd+ {s['new_score']:.4f}; champion "
              f"{'moved to it' if s['promoted'] else 'kept'} (previous champion: {was})")
    elif outcome.selection:
        print(f"selection failed: {outcome.selection['error']}")
    print(f"results: {study.path}")
    print(f"MLflow:  {study.tracking_uri}  experiment '{study.experiment}', parent run {outcome.parent_run_id}")
    if outcome.mlflow_command:
        print(f"  serve the UI: {outcome.mlflow_command}")
    if outcome.mlflow_link:
        print(f"  open:         {outcome.mlflow_link}")
    print(f"Optuna:  {outcome.optuna_storage}  study '{study.key}'")
    if outcome.replay_file:
        print(f"WARNING: {outcome.undelivered_points} metric points (and other records) could not be logged to "
              f"MLflow; replay them with: mann-search replay {outcome.replay_file}", file=sys.stderr)


def _counts(outcomes) -> str:
    """``completed 3, early_stopped 13`` (search.protocol's endings, most frequent first)."""
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o] = counts.get(o, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def cmd_run(args) -> int:
    from . import runner

    outcome = runner.run(args.config, args.set, verbose=args.verbose)
    _print_outcome(outcome)
    return 0 if outcome.trials else 1


def cmd_resume(args) -> int:
    from . import runner

    outcome = runner.resume(args.path, verbose=args.verbose)
    _print_outcome(outcome)
    return 0


def cmd_select(args) -> int:
    from .runner import tracker_for
    from .selection import select
    from .study import Study

    study = Study.load(args.path)
    print(json.dumps(select(study, tracker_for(study)), indent=2, default=str))
    return 0


def cmd_export(args) -> int:
    import yaml

    from .console import quiet_libraries
    from .searcher import trial_recipe
    from .study import Study

    quiet_libraries(False)
    label, cfg, what = trial_recipe(Study.load(args.path), args.trial)
    out = args.out or "-"
    text = (f"# {what}\n# train it: mann train --config {out if out != '-' else 'THIS_FILE'}\n"
            + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if out == "-":
        print(text, end="")
    else:
        Path(out).write_text(text)
        print(f"{label}: written to {out} ({what})")
    return 0


def cmd_status(args) -> int:
    from .console import quiet_libraries
    from .runner import status

    quiet_libraries(False)  # Optuna's "Using an existing study" line
    info = status(args.path)
    if args.json:
        print(json.dumps(info, default=str))
        return 0
    print(f"study {info['study']} at {info['path']}")
    print(f"trials {info['trials']} of {info['num_samples']}; by outcome: "
          + _counts(info["trial_outcomes"].values()))
    if info.get("paused"):
        print(f"paused (checkpoint kept, resumed when their turn comes): {', '.join(info['paused'])}")
        for name in info["paused"]:
            if info.get("paused_why", {}).get(name):
                print(f"  {name}: {info['paused_why'][name]}")
    sched, budget = info["scheduler"], info["budget"]
    flat = {k: v for k, v in sched.items() if not isinstance(v, dict)}
    for v in sched.values():
        if isinstance(v, dict):
            flat.update(v)
    cap = f", episode cap {budget['max_episodes']}" if budget.get("max_episodes") else ""
    print("scheduler " + ", ".join(f"{k} {v}" for k, v in flat.items())
          + f"; budget {budget['num_samples']} samples{cap} (the study's snapshot: a resume keeps these)")
    if info["best"]:
        trial = str(info["best"]["trial"])
        print(f"best {info['metric']} {info['best']['value']:.4f}: {trial}")
        print(f"  as a MANN config: mann-search export {info['path']} --trial {label_of(trial)}")
    print(f"MLflow {info['tracking_uri']} experiment '{info['experiment']}'")
    if info.get("mlflow_command"):
        print(f"  serve the UI: {info['mlflow_command']}")
    if info.get("mlflow_link"):
        print(f"  open:         {info['mlflow_link']}")
    print(f"Optuna {info['optuna_storage']} study '{info['optuna_study']}'")
    return 0


def cmd_ui(args) -> int:
    from .ui import serve

    return serve(args.path, args.host, args.port)


def cmd_replay(args) -> int:
    from .runner import replay

    delivered, pending = replay(args.file, args.tracking_uri)
    print(f"delivered {delivered} metric points; {pending} still pending")
    return 0 if pending == 0 else 1


def cmd_curves_record(args) -> int:
    from .bench.curves import record

    n = record(args.config, args.set, Path(args.out), args.configs, args.seeds, args.workers, args.draw_seed,
               args.limit_s)
    print(f"{n} curves recorded into {args.out}")
    return 0


def fraction(text: str) -> float:
    """A budget fraction in (0, 1]."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction of the budget in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction of the budget in (0, 1], got {text!r}")
    return value


def cmd_curves_signals(args) -> int:
    import json

    from .bench.signals import format_report, markdown_report, table_signals

    report = table_signals(args.tables, tuple(args.at or (0.1, 0.25)), args.boot)
    print(json.dumps(report, indent=1) if args.json else markdown_report(report) if args.markdown
          else format_report(report))
    return 0


def cmd_benchmark(args) -> int:
    from mann.config import ConfigError

    from .bench.curves import read_header
    from .bench.methods import BENCHMARK_SET
    from .bench.replay import benchmark_tables
    from .bench.table import noise_warning
    from .config import load_search_config

    def shipped_of(path: str):
        """A table's shipped search config (--config, else configs/search/<table name>.yaml, if any) with --set
        applied, and how often its studies report (every k-th recorded evaluation, as the config evaluates)."""
        head = read_header(path)
        shipped = args.config
        if shipped is None:
            guess = Path(__file__).resolve().parents[1] / "configs" / "search" / f"{head.get('name')}.yaml"
            shipped = str(guess) if guess.is_file() else None
        if args.set and not shipped:
            raise ConfigError(f"--set: no shipped search config to apply it to for {path} (none named "
                              f"{head.get('name')}.yaml in configs/search; name one with --config)")
        loaded = load_search_config(shipped, args.set) if shipped else None
        every = args.report_every
        if every is None:
            recorded = max(1, int(head.get("eval_every") or 1))
            every = max(1, round(loaded.base.train.eval_every / recorded)) if loaded else 1
        return {"shipped": loaded.config if loaded else None, "every": every, "shipped_file": shipped}

    for item in args.set:
        key = item.split("=", 1)[0].strip()
        if not key.startswith(BENCHMARK_SET):
            raise ConfigError(f"--set {key}: the benchmark does not read it. It takes the shipped config's "
                              f"{', '.join(BENCHMARK_SET)} (the methods fix the sampler kind, each repetition's "
                              "index is its seed, --num-samples / --max-concurrent give the study's shape)")
    per_table = [shipped_of(p) for p in args.curves]
    repeats = args.repeats or (100 if args.engine == "sim" else 20)
    log = (lambda m: None) if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    out = benchmark_tables(args.curves, repeats=repeats, methods=args.methods, compress=args.compress,
                           plot=args.plot, per_table=per_table, parallel=args.parallel, progress=log,
                           engine=args.engine, n_boot=args.n_boot, num_samples=args.num_samples,
                           max_concurrent=args.max_concurrent)
    out["command"] = " ".join(["mann-search", "benchmark", *sys.argv[2:]])
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save).write_text(json.dumps(out) + "\n")
    if args.json:
        print(json.dumps(out))
        return 0
    if args.markdown:
        print(benchmark_markdown(out))
        return 0
    for name, t in out["tables"].items():
        print(f"{name}: {t['curves']} curves of {t['configs']} configurations, {t['repeats']} repeats, {t['engine']} "
              f"engine, {t['wall_s']:.0f} s; {_shape(t)}budgets as fractions of {t['full_study_episodes']:.0f} "
              f"episodes (the baseline's full study); target: {t['target_regret']:.2f} points; default: {t['default']}")
        head = ["method", "regret@0.25", "@0.5", "@1.0", "speed-up [95 %]", "reached", "killed", "paused"]
        rows = [[m, *(f"{v['regret_at'][f]['median']:.2f}" for f in ("0.25", "0.5", "1.0")),
                 f"{_ci(v['speedup']['median'])} [{_ci(v['speedup']['ci95'][0])}, {_ci(v['speedup']['ci95'][1])}]",
                 f"{v['reached'] * 100:.0f} %", f"{v['kill_before_click']['stopped'] * 100:.1f} %",
                 f"{v['kill_before_click']['paused_never_resumed'] * 100:.1f} %"]
                for m, v in t["methods"].items()]
        for line in table(head, rows, right=set(range(1, 8))):
            print(line)
        if noise_warning(t.get("config_share")):
            print(noise_warning(t.get("config_share")))
        for m, v in t["methods"].items():
            if v.get("spend_to_target"):
                print(spend_line(m, v))
        print(oracle_line(t))
        print(f"plot: {t['plot']}")
    for m, g in out["across_tables"].items():
        print(f"across tables, {m}: speed-up geometric mean {g['speedup_geomean']} {g['ci95']}")
    if len(out["tables"]) > 1:
        print(f"across tables, oracle screen: speed-up bound geometric mean {_ci(out['oracle_screen_bound_geomean'])}")
    return 0


def cmd_compare(args) -> int:
    from .bench.replay import compare_saved

    out = compare_saved(args.a, args.b, args.method, n_boot=args.n_boot)
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{args.method}: B's speed-up over A (A's median episodes to the target over B's), paired by study")
    head = ["table", "A speed-up", "A reached", "B speed-up", "B reached", "B over A [95 %, paired]"]
    rows = [[name, _ci(t["a"]["speedup"]), f"{t['a']['reached'] * 100:.0f} %", _ci(t["b"]["speedup"]),
             f"{t['b']['reached'] * 100:.0f} %",
             f"{_ci(t['b_over_a']['median'])} [{_ci(t['b_over_a']['ci95'][0])}, {_ci(t['b_over_a']['ci95'][1])}]"]
            for name, t in out["tables"].items()]
    for line in table(head, rows, right=set(range(1, 6))):
        print(line)
    g = out["across_tables"]
    print(f"across {len(rows)} tables: B over A, geometric mean {_ci(g['b_over_a_geomean'])} "
          f"[{_ci(g['ci95'][0])}, {_ci(g['ci95'][1])}]")
    if out["only_in_one"]:
        print(f"not compared (in one run only): {', '.join(out['only_in_one'])}")
    return 0


def spend_line(method: str, v: dict) -> str:
    """Where a pause-and-resume method's episodes went before its studies reached the target (full runs per
    study): on configurations at the target, and on the others by the scheduler's last word on each trial."""
    spend = dict(v["spend_to_target"])
    good = spend.pop("good", 0.0)
    return (f"{method}, episodes before the target (full runs per study, mean): {good:.2f} on configurations at "
            f"the target; on the others, by the scheduler's last word on the trial: "
            + ", ".join(f"{k} {x:.2f}" for k, x in spend.items()))


def oracle_line(t: dict) -> str:
    """One table's oracle-screen bound in a sentence (search.bench.bound)."""
    o = t["oracle_screen"]
    return (f"oracle screen (random sampling, each configuration judged perfectly at its click; a bound, not a "
            f"method): {o['episodes_to_target']:.0f} episodes to the target, speed-up bound {_ci(o['speedup_bound'])} "
            f"({o['good_configs']} configurations at or under the target; deadline {o['deadline']:.0%} of a run)")


def _ci(v) -> str:
    """A figure that may be missing (an unbounded interval's end): two decimals or "-"."""
    return "-" if v is None else f"{v:.2f}"


def _shape(t: dict) -> str:
    shape = t.get("study_shape")
    return (f"baseline study: {shape['num_samples']} trials, {shape['max_concurrent'] or 'unlimited'} at once; "
            if shape else "")


def benchmark_markdown(out: dict) -> str:
    """The benchmark's figures as Markdown tables (README and docs/benchmark.md are pasted from this)."""
    from .bench.table import noise_warning

    lines = []
    for name, t in out["tables"].items():
        lines += [f"**{name}** ({t['curves']} curves of {t['configs']} configurations; {t['repeats']} repeats, "
                  f"{t['engine']} engine, {t['wall_s']:.0f} s; {_shape(t)}budget unit: the baseline's full study, "
                  f"{t['full_study_episodes']:.0f} episodes; episode cap {t['episode_cap']}; target: "
                  f"{t['target_regret']:.2f} points)", "",
                  "| method | regret @0.25 | @0.5 | @1.0 | speed-up [95 % CI] | reached | stopped: top-quartile share "
                  "(trials) | paused, never resumed: share (trials) |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for m, v in t["methods"].items():
            r = v["regret_at"]
            k = v["kill_before_click"]
            sp = v["speedup"]
            lines.append(
                f"| {m} | " + " | ".join(f"{r[f]['median']:.2f} [{r[f]['ci95'][0]:.2f}, {r[f]['ci95'][1]:.2f}]"
                                         for f in ("0.25", "0.5", "1.0"))
                + f" | {_ci(sp['median'])} [{_ci(sp['ci95'][0])}, {_ci(sp['ci95'][1])}] | {v['reached'] * 100:.0f} % | "
                + (f"{k['stopped'] * 100:.1f} % ({k['stopped_trials']})" if k["stopped_trials"] else "-") + " | "
                + (f"{k['paused_never_resumed'] * 100:.1f} % ({k['paused_trials']})" if k["paused_trials"] else "-")
                + " |")
        warning = noise_warning(t.get("config_share"))
        lines += ["", *([warning + ".", ""] if warning else []),
                  *[spend_line(m, v) + "." for m, v in t["methods"].items() if v.get("spend_to_target")],
                  oracle_line(t) + ".", ""]
    if len(out.get("tables", {})) > 1 and out.get("across_tables"):
        lines += [f"Across {len(out['tables'])} tables: geometric mean of the speed-ups", "",
                  "| method | speed-up, geometric mean [95 % CI] |", "| --- | ---: |"]
        for m, g in out["across_tables"].items():
            lines.append(f"| {m} | {_ci(g['speedup_geomean'])} [{_ci(g['ci95'][0])}, {_ci(g['ci95'][1])}] |")
        lines.append(f"| oracle screen (bound, not a method) | {_ci(out.get('oracle_screen_bound_geomean'))} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = parser_class(PROG)
    p = parser(prog=PROG, description="Optuna-guided Ray Tune search over MANN hyperparameters")
    sub = p.add_subparsers(dest="command", required=True, parser_class=parser)
    r = sub.add_parser("run", help="run a search (joins RAY_ADDRESS or starts a local Ray)")
    r.add_argument("config", help="configs/search/<name>.yaml")
    r.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    r.add_argument("--verbose", action="store_true", help="Ray's own progress tables and the libraries' logs too")
    r.set_defaults(fn=cmd_run)
    rs = sub.add_parser("resume", help="continue an interrupted study (from its snapshot, not its YAML)")
    rs.add_argument("path", help="the study folder printed by `run`")
    rs.add_argument("--verbose", action="store_true", help="Ray's own progress tables and the libraries' logs too")
    rs.set_defaults(fn=cmd_resume)
    se = sub.add_parser("select", help="re-evaluate the top trials on test characters; promote the champion")
    se.add_argument("path")
    se.set_defaults(fn=cmd_select)
    st = sub.add_parser("status", help="progress of a study")
    st.add_argument("path")
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=cmd_status)
    ex = sub.add_parser("export", help="a trial as a complete MANN config for `mann train --config` (default: "
                                       "the best trial that ran its full budget)")
    ex.add_argument("path", help="the study folder printed by `run`")
    ex.add_argument("--trial", help="t08 or 8 (default: the best complete trial)")
    ex.add_argument("--out", help="a YAML file to write (default: stdout)")
    ex.set_defaults(fn=cmd_export)
    ui = sub.add_parser("ui", help="serve the study's MLflow UI (its SQLite store and artifacts; no job runner)")
    ui.add_argument("path", help="the study folder printed by `run`")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=positive_int, default=5000)
    ui.set_defaults(fn=cmd_ui)
    rp = sub.add_parser("replay", help="deliver MLflow records saved while the server was down")
    rp.add_argument("file")
    rp.add_argument("--tracking-uri")
    rp.set_defaults(fn=cmd_replay)
    cu = sub.add_parser("curves", help="tables of real learning curves for `mann-search benchmark`")
    cus = cu.add_subparsers(dest="action", required=True, parser_class=parser)
    rec = cus.add_parser("record", help="train configurations drawn from a search space to the full budget")
    rec.add_argument("config", help="configs/search/<name>.yaml (its space, base and overrides)")
    rec.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    rec.add_argument("--out", required=True, help="results/curves/<name>.jsonl (appended to; a rerun goes on)")
    rec.add_argument("--configs", type=positive_int, default=100, help="distinct configurations drawn at random")
    rec.add_argument("--seeds", type=positive_int, default=2, help="training seeds per configuration")
    rec.add_argument("--workers", type=positive_int, default=1, help="trainings at once (one thread each)")
    rec.add_argument("--draw-seed", type=int, default=0, help="seed of the random draw of configurations")
    rec.add_argument("--limit-s", type=float, default=None, help="start no training after this many seconds")
    rec.set_defaults(fn=cmd_curves_record)
    sig = cus.add_parser("signals", help="how well each signal early in a curve predicts its end (rank "
                                         "correlation, AUROC for a click)")
    sig.add_argument("tables", nargs="+", help="tables written by `mann-search curves record`")
    sig.add_argument("--at", type=fraction, action="append", default=None, metavar="F",
                     help="budget fractions to read the signals at (repeat; default 0.1 and 0.25)")
    sig.add_argument("--boot", type=positive_int, default=2000, help="bootstrap resamples of the intervals")
    sig.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    sig.add_argument("--markdown", action="store_true", help="Markdown tables (as README shows them)")
    sig.set_defaults(fn=cmd_curves_signals)
    be = sub.add_parser("benchmark", help="compare search methods on a table of recorded curves (no training)")
    be.add_argument("--curves", required=True, action="append",
                    help="a table written by `mann-search curves record` (repeat for several tables)")
    be.add_argument("--engine", choices=("sim", "tune"), default="sim",
                    help="sim: the study's searcher and scheduler on simulated time (default); tune: real Tuners")
    be.add_argument("--repeats", type=positive_int, default=None,
                    help="studies per method (seeds 0..N-1; default 100 for sim, 20 for tune)")
    be.add_argument("--n-boot", type=positive_int, default=2000, help="bootstrap resamples of each interval")
    be.add_argument("--json", action="store_true", help="print one JSON object")
    be.add_argument("--markdown", action="store_true",
                    help="print the figures as Markdown tables (as README shows them)")
    be.add_argument("--save", metavar="FILE", help="also write the JSON object to FILE")
    be.add_argument("--methods", nargs="+", default=None, help="a subset of the methods (the baseline always runs)")
    be.add_argument("--config", help="the shipped search config, for every table (default: each table's "
                                     "configs/search/<table name>.yaml)")
    be.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                    help="override the shipped config (e.g. scheduler.plateau.click_slack=2): its scheduler settings "
                         "are the ones the methods of that scheduler kind use; its sampler.n_startup_trials and "
                         "sampler.constant_liar every method's; train.eval_every how often studies report; any "
                         "other key is refused")
    be.add_argument("--num-samples", type=positive_int, default=None,
                    help="the baseline's trials per study (default: as the table's recorded search); every other "
                         "method gets 4x as many under the baseline's largest spend")
    be.add_argument("--max-concurrent", type=positive_int, default=None,
                    help="trials at once in every study (default: as the table's recorded search), e.g. 32 for "
                         "cluster.yaml's shape")
    be.add_argument("--plot", help="where the plot goes (default: beside the table, <table>.benchmark.png)")
    be.add_argument("--compress", type=float, default=0.005, help="replayed seconds per recorded training second")
    be.add_argument("--parallel", type=positive_int, default=3, help="studies at once (threads, one Ray)")
    be.add_argument("--report-every", type=positive_int, default=None,
                    help="report every k-th recorded evaluation (default: the shipped config's eval_every)")
    be.set_defaults(fn=cmd_benchmark)
    co = sub.add_parser("compare", help="two saved benchmark runs of one method (e.g. a setting against the "
                                         "defaults), paired study by study")
    co.add_argument("--a", nargs="+", required=True, metavar="JSON",
                    help="run A: files written by `mann-search benchmark --save` (or folders of them)")
    co.add_argument("--b", nargs="+", required=True, metavar="JSON", help="run B, the same way")
    co.add_argument("--method", default="tpe+freeze_thaw", help="the method to compare (default: tpe+freeze_thaw)")
    co.add_argument("--n-boot", type=positive_int, default=2000, help="bootstrap resamples of each interval")
    co.add_argument("--json", action="store_true", help="print one JSON object")
    co.set_defaults(fn=cmd_compare)
    return p


def main(argv: list[str] | None = None) -> int:
    from mann.config import ConfigError
    from mann.omniglot import DataError

    from .study import SearchError

    args = build_parser().parse_args(argv)
    if getattr(args, "verbose", False):
        os.environ["MANN_SEARCH_VERBOSE"] = "1"  # also read by the trials of a local Ray (search/trainable.py)
    logging.basicConfig(level=logging.INFO if os.environ.get("MANN_SEARCH_VERBOSE") else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command in ("run", "resume", "benchmark", "curves"):
        from .ray_cluster import prefer_loopback

        prefer_loopback()
    return run_command(PROG, args, (ConfigError, DataError, SearchError, FileNotFoundError),
                       interrupted="interrupted; continue with `mann-search resume <study folder>`")


if __name__ == "__main__":
    sys.exit(main())
