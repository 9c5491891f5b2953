"""`mann-search run | resume | select | status | replay`.

Bad input (config, arguments, unreachable Ray or MLflow) exits with status 2 and one line naming the culprit.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from mann.cli import one_line

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        print(f"mann-search: error: {one_line(f'{self.prog}: {message}')}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _print_outcome(outcome) -> None:
    from .config import load_search_config

    loaded = load_search_config(outcome.study.config_file, outcome.study.overrides)
    primary = loaded.config.primary
    rows = [t for t in outcome.trials if primary.metric in t["metrics"]]
    rows.sort(key=lambda t: t["metrics"][primary.metric], reverse=primary.mode == "max")
    print()
    print(f"study {outcome.study.key}: {len(outcome.trials)} trials in {outcome.wall_s:.0f} s")
    keys = list(loaded.config.space)
    head = ["#", primary.metric, "episodes"] + [k.split(".")[-1] for k in keys] + ["acc by instance (%)"]
    print("  ".join(head))
    for i, t in enumerate(rows[:10], 1):
        m = t["metrics"]
        accs = " ".join(f"{m[f'val/acc_{k}'] * 100:.0f}" for k in range(1, 21) if f"val/acc_{k}" in m)
        vals = [_fmt(t["config"].get(k, "-")) for k in keys]
        print("  ".join([str(i), f"{m[primary.metric]:.4f}", str(int(m.get("episodes", 0)))] + vals + [accs]))
    stopped = sum(1 for t in outcome.trials if t["metrics"].get("episodes", 0) < _max_episodes(loaded))
    print(f"trials that ended before the full budget (early-stopped or failed): {stopped}")
    if outcome.trial_wall_s > 0:
        share = 1 - outcome.train_s / outcome.trial_wall_s
        print(f"time in training steps: {outcome.train_s:.0f} s of {outcome.trial_wall_s:.0f} s trial time "
              f"(outside training steps: {share * 100:.1f} %)")
    if outcome.selection and "error" not in outcome.selection:
        s = outcome.selection
        print(f"selection: version {s['new_version']} of '{s['registered_model']}', test acc 2nd+ "
              f"{s['new_score']:.4f}; champion {'moved to it' if s['promoted'] else 'kept'}"
              f" (previous: {s['previous_champion']})")
    elif outcome.selection:
        print(f"selection failed: {outcome.selection['error']}")
    print(f"results: {outcome.study.path}")
    print(f"MLflow:  {outcome.study.tracking_uri}  experiment '{outcome.study.experiment}', parent run "
          f"{outcome.parent_run_id}")
    if outcome.replay_file:
        print(f"WARNING: {outcome.undelivered_points} metric points (and other records) could not be logged to "
              f"MLflow; replay them with: mann-search replay {outcome.replay_file}", file=sys.stderr)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _max_episodes(loaded) -> int:
    from mann.config import TrainConfig, from_dict

    return from_dict(TrainConfig, loaded.base_tree).train.episodes


def cmd_run(args) -> int:
    from . import runner

    outcome = runner.run(args.config, args.set)
    _print_outcome(outcome)
    return 0 if outcome.trials else 1


def cmd_resume(args) -> int:
    from . import runner

    outcome = runner.resume(args.path)
    _print_outcome(outcome)
    return 0


def cmd_select(args) -> int:
    from .config import load_search_config
    from .runner import Study
    from .selection import select
    from .tracking import StudyTracker
    from .runner import _artifact_root

    study = Study.load(args.path)
    loaded = load_search_config(study.config_file, study.overrides)
    tracker = StudyTracker(study.tracking_uri, study.experiment, study.key, study.local_dir / "mlflow-staging",
                           artifact_root=_artifact_root(study))
    print(json.dumps(select(study, loaded, tracker), indent=2, default=str))
    return 0


def cmd_status(args) -> int:
    from .runner import status

    info = status(args.path)
    if args.json:
        print(json.dumps(info, default=str))
        return 0
    print(f"study {info['study']} at {info['path']}")
    print(f"trials {info['trials']} of {info['num_samples']}: "
          + ", ".join(f"{k.lower()} {v}" for k, v in sorted(info["states"].items())))
    if info["best"]:
        print(f"best {info['metric']} {info['best']['value']:.4f} ({info['best']['trial']}): {info['best']['config']}")
    print(f"MLflow {info['tracking_uri']} experiment '{info['experiment']}'")
    return 0


def cmd_replay(args) -> int:
    from .runner import replay

    delivered, pending = replay(args.file, args.tracking_uri)
    print(f"delivered {delivered} metric points; {pending} still pending")
    return 0 if pending == 0 else 1


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mann-search", description="Optuna-guided Ray Tune search over MANN hyperparameters")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="run a search (joins RAY_ADDRESS or starts a local Ray)")
    r.add_argument("config", help="configs/search/<name>.yaml")
    r.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    r.set_defaults(fn=cmd_run)
    rs = sub.add_parser("resume", help="continue an interrupted study")
    rs.add_argument("path", help="the study folder printed by `run`")
    rs.set_defaults(fn=cmd_resume)
    se = sub.add_parser("select", help="re-evaluate the top trials on test characters; promote the champion")
    se.add_argument("path")
    se.set_defaults(fn=cmd_select)
    st = sub.add_parser("status", help="progress of a study")
    st.add_argument("path")
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=cmd_status)
    rp = sub.add_parser("replay", help="deliver MLflow records saved while the server was down")
    rp.add_argument("file")
    rp.add_argument("--tracking-uri")
    rp.set_defaults(fn=cmd_replay)
    return p


def main(argv: list[str] | None = None) -> int:
    from mann.config import ConfigError
    from mann.omniglot import DataError

    from .runner import SearchError

    logging.basicConfig(level=logging.INFO if os.environ.get("MANN_SEARCH_VERBOSE") else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, DataError, SearchError, FileNotFoundError) as exc:
        if os.environ.get("MANN_DEBUG"):
            raise
        print(f"mann-search: error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("mann-search: interrupted; continue with `mann-search resume <study folder>`", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
