"""`mann train | evaluate | data | bench`.

Bad input (config, data, arguments) exits with status 2 and one line naming the culprit, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from pathlib import Path

from .config import ConfigError, DataConfig, from_dict, load_train_config

EXIT_USAGE = 2


def one_line(message: str) -> str:
    """Escape control characters (from hostile input), so an error is always exactly one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


def fail(prog: str, message: str) -> int:
    """Print ``PROG: error: MESSAGE`` as one line on stderr; the usage exit status."""
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
    return EXIT_USAGE


def parser_class(prog: str) -> type[argparse.ArgumentParser]:
    """An ArgumentParser whose errors are one line (``PROG: error: ...``), not argparse's usage dump."""

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> None:
            raise SystemExit(fail(prog, f"{self.prog}: {message}"))

    return Parser


def run_command(prog: str, args: argparse.Namespace, usage_errors: tuple[type[BaseException], ...],
                failures: tuple[type[BaseException], ...] = (), interrupted: str = "interrupted") -> int:
    """Run ``args.fn(args)`` as a CLI: bad input (``usage_errors``) exits 2 with one line naming the culprit,
    never a traceback (MANN_DEBUG=1 shows it); ``failures`` (a run that went wrong) print and exit 1."""
    try:
        return args.fn(args)
    except usage_errors as exc:
        if os.environ.get("MANN_DEBUG"):
            raise
        return fail(prog, str(exc))
    except failures as exc:
        print(f"{prog}: {one_line(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:  # a message of its own (where to go on) replaces the generic one
        print(f"{prog}: {exc or interrupted}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (``| head``): stop quietly, as a Unix tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return 141


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


class _Progress:
    """Progress on stderr (a bar when it is a terminal) and one line per evaluation on stdout."""

    def __init__(self, total_episodes: int):
        from .train import Callback

        self.total = total_episodes
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.last = 0.0
        outer = self

        class _CB(Callback):
            def on_step(self, step, episodes):
                outer.step(episodes)

            def on_eval(self, report):
                outer.eval(report)

        self.callback = _CB()

    def step(self, episodes: int) -> None:
        now = time.perf_counter()
        if not self.tty or now - self.last < 0.5:
            return
        self.last = now
        frac = min(1.0, episodes / self.total)
        bar = "#" * int(30 * frac)
        rate = episodes / max(now - self.t0, 1e-9)
        print(f"\r[{bar:<30}] {episodes}/{self.total} episodes  {rate:.0f} ep/s", end="", file=sys.stderr)

    def eval(self, report) -> None:
        if self.tty:
            print("\r" + " " * 70 + "\r", end="", file=sys.stderr)
        accs = " ".join(f"{k + 1}:{a * 100:5.1f}" for k, a in enumerate(report.val.accuracy_by_instance))
        elapsed = time.perf_counter() - self.t0
        print(
            f"episodes {report.episodes:>7}  train_loss {report.train_loss:.4f}  {report.val.split}_loss "
            f"{report.val.loss:.4f}  acc by instance % {accs}  ({elapsed:.0f}s)",
            flush=True,
        )


@contextlib.contextmanager
def _data_dir_flag(flag: str | None):
    """A data error names ``--data-dir`` when the flag set the directory (it fills the config key
    ``data.data_dir``, which the error would name otherwise)."""
    from .omniglot import DataError

    try:
        yield
    except DataError as exc:
        if not flag:
            raise
        raise DataError(str(exc).replace("(from data.data_dir)", "(from --data-dir)")) from None


def cmd_train(args) -> int:
    from .train import train

    cfg = load_train_config(args.config, args.set)
    out = Path(args.out) if args.out else Path("runs") / time.strftime("train-%Y%m%d-%H%M%S")
    if out.exists() and not out.is_dir():  # before any training: its checkpoints could not be written there
        raise ConfigError(f"--out {out}: exists and is not a folder (the run's checkpoints and metrics go in a folder)")
    from .omniglot import find_sources
    find_sources(cfg.data.resolved_data_dir(), cfg.data.data_dir_origin)  # a bad data setting: before the start line
    progress = _Progress(cfg.train.episodes)
    task = cfg.task
    shape = (f"{task.classes} classes x {task.instances} instances" if task.sampling == "balanced" else
             f"{task.classes} classes, {task.length} steps with random classes (instances 1-{task.instances} scored)")
    print(f"training {cfg.model.kind} on {shape}; out: {out}")
    result = train(cfg, callbacks=[progress.callback], out_dir=out, resume_from=args.resume)
    print(f"done: {result.episodes} episodes, checkpoint {result.checkpoint}")
    return 0


def cmd_evaluate(args) -> int:
    from .train import evaluate_checkpoint

    t0 = time.perf_counter()
    with _data_dir_flag(args.data_dir):
        result, payload, cfg = evaluate_checkpoint(args.checkpoint, args.split, args.episodes, args.seed, args.device,
                                                   args.data_dir)
    seconds = time.perf_counter() - t0
    out = result.as_dict()
    out.update(checkpoint=str(args.checkpoint), seed=args.seed, trained_episodes=payload.get("episodes"),
               model=cfg.model.kind, seconds=round(seconds, 2))
    if args.json:
        print(json.dumps(out))
        return 0
    cols = [k for k in (1, 2, 3, 4, 5, 10) if k <= cfg.task.instances]
    print(f"{cfg.model.kind} checkpoint {args.checkpoint} ({payload.get('episodes')} training episodes)")
    print(f"{args.split} split, {args.episodes} episodes, seed {args.seed}: accuracy (%) by instance, 95% CI")
    print("  ".join(f"{k:>11}" for k in ("1st", "2nd", "3rd", "4th", "5th", "10th")[: len(cols)]))
    print("  ".join(
        f"{result.accuracy_by_instance[k - 1] * 100:5.1f}±{result.ci95[k - 1] * 100:4.1f}".rjust(11) for k in cols
    ))
    return 0


def cmd_data(args) -> int:
    from . import omniglot

    given = {"data_dir": args.data_dir, "cache_dir": args.cache_dir, "image_size": args.image_size,
             "verify_counts": not args.no_verify_counts}
    try:
        cfg = from_dict(DataConfig, {k: v for k, v in given.items() if v is not None})
    except ConfigError as exc:  # name the flag, not the config key: "--image-size: ..." for "image_size: ..."
        raise ConfigError(re.sub(r"^(data_dir|cache_dir|image_size)\b", lambda m: "--" + m.group(1).replace("_", "-"),
                                 str(exc))) from None
    if args.action == "download":
        for path in omniglot.download(cfg.resolved_data_dir()):
            print(f"ok {path}")
        return 0
    with _data_dir_flag(args.data_dir):
        info = omniglot.describe(cfg)
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"data dir   {info['data_dir']}")
    for name, path in info["sources"].items():
        print(f"  {name:<18} {path}  ({info['characters_per_source'].get(name, 0)} characters)")
    print(f"characters {info['characters']} in {info['alphabets']} alphabets, {info['drawers']} drawers each")
    print(f"images     {info['image_size']}x{info['image_size']} uint8, digest {info['digest'][:16]}")
    state = "hit" if info["from_cache"] else "built"
    print(f"cache      {info['cache']} ({state}, {info['load_seconds']} s)")
    s = info["split"]
    print(f"split      train {s['train']} (+rotations: {s['train_classes_with_rotations']} classes), "
          f"val {s['val']}, test {s['test']}")
    return 0


def cmd_bench(args) -> int:
    from .bench import run_bench

    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    parser = parser_class("mann")
    p = parser(prog="mann", description="Memory-Augmented Neural Networks (Santoro et al. 2016) on Omniglot")
    sub = p.add_subparsers(dest="command", required=True, parser_class=parser)

    t = sub.add_parser("train", help="train a model from a YAML config")
    t.add_argument("--config", required=True, help="configs/mann/<name>.yaml")
    t.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a config value")
    t.add_argument("--out", help="output directory (checkpoint.pt, metrics.jsonl); default runs/train-<time>")
    t.add_argument("--resume", help="checkpoint file or directory to continue from")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("evaluate", help="accuracy by instance number of a checkpoint")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--split", choices=["test", "val", "train"], default="test")
    e.add_argument("--episodes", type=positive_int, default=1000)
    e.add_argument("--seed", type=_int, default=0)
    e.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    e.add_argument("--data-dir", help="Omniglot directory (default: the checkpoint's, else MANN_DATA_DIR)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(fn=cmd_evaluate)

    d = sub.add_parser("data", help="check or download Omniglot")
    d.add_argument("action", choices=["check", "download"])
    d.add_argument("--data-dir", help="default: MANN_DATA_DIR")
    d.add_argument("--cache-dir", help="default: MANN_CACHE_DIR, else ~/.cache/mann-search")
    d.add_argument("--image-size", type=positive_int, default=20)
    d.add_argument("--no-verify-counts", action="store_true", help="accept a reduced data set")
    d.add_argument("--json", action="store_true")
    d.set_defaults(fn=cmd_data)

    b = sub.add_parser("bench", help="time training steps (episodes/s)")
    b.add_argument("--config", default=None, help="default: configs/mann/paper.yaml settings")
    b.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    b.add_argument("--batch-size", type=positive_int)
    b.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    b.add_argument("--steps", type=positive_int, default=5, help="timed steps per repeat")
    b.add_argument("--repeats", type=positive_int, default=11)
    b.add_argument("--warmup", type=_int, default=3)
    b.add_argument("--threads", type=positive_int)
    b.add_argument("--compare", action="append", default=[], metavar="CONFIG.yaml|KEY.PATH=VALUE",
                   help="also time a second model (a config file and/or overrides on top of --config/--set), "
                        "interleaved with the first, and print the paired ratio")
    b.add_argument("--compare-plain", action="store_true", help="also time the plain step-by-step port")
    b.add_argument("--compare-prefetch", action="store_true",
                   help="also time whole training loops (a fresh batch every step) with sampling in the loop "
                        "and with it on the background thread")
    b.add_argument("--json", action="store_true")
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    from .omniglot import DataError
    from .train import TrainingDiverged

    args = build_parser().parse_args(argv)
    return run_command("mann", args, (ConfigError, DataError, FileNotFoundError, ValueError), (TrainingDiverged,))


if __name__ == "__main__":
    sys.exit(main())
