"""Property-based hostile input: thousands of generated invalid configs and CLI arguments, zero tracebacks, every
error names the offending field or argument."""

from __future__ import annotations

import contextlib
import io
import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mann.cli import main as mann_main
from mann.config import ConfigError, TrainConfig, apply_overrides, from_dict
from search.cli import main as search_main
from search.config import load_search_config

from .test_config import REPO

DEFAULTS = TrainConfig().to_dict()


def leaves(tree, prefix=""):
    for k, v in tree.items():
        path = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            yield from leaves(v, path)
        else:
            yield path


LEAVES = sorted(leaves(DEFAULTS))
SECTIONS = sorted({p.rsplit(".", 1)[0] for p in LEAVES if "." in p})

junk = st.one_of(
    st.text(max_size=12), st.integers(min_value=-10**12, max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
names = st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=10)

FAST = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(path=st.sampled_from(LEAVES), value=junk)
def test_mutated_mann_config_fails_cleanly_naming_the_field(path, value):
    tree = apply_overrides(DEFAULTS, [(path, value)])
    try:
        cfg = from_dict(TrainConfig, tree)
    except ConfigError as exc:
        msg = str(exc)
        first = msg.split(":", 1)[0]
        # the culprit's path, or (for cross-field rules) another field of the same section
        assert first == path or first.rsplit(".", 1)[0] == path.rsplit(".", 1)[0] or path.startswith(first), msg
    else:
        assert cfg.to_dict() is not None  # the value happened to be valid


@FAST
@given(section=st.sampled_from(SECTIONS + [""]), key=names, value=junk)
def test_unknown_keys_are_named(section, key, value):
    path = f"{section}.{key}" if section else key
    known = {p.rsplit(".", 1)[-1] for p in LEAVES if (p.rsplit(".", 1)[0] if "." in p else "") == section}
    known |= {s.split(".")[0] for s in SECTIONS} if not section else set()
    if key in known or (not section and key in DEFAULTS):
        return
    tree = yaml.safe_load(yaml.safe_dump(DEFAULTS))
    node = tree
    for part in section.split(".") if section else []:
        node = node[part]
    node[key] = value
    with pytest.raises(ConfigError, match=rf"^{path.replace('.', r'[.]')}: unknown config key"):
        from_dict(TrainConfig, tree)


SEARCH_PATHS = ["budget.num_samples", "budget.max_concurrent", "budget.time_budget_s", "budget.max_failures",
                "resources.cpus_per_trial", "resources.gpus_per_trial", "sampler.kind", "sampler.seed",
                "scheduler.kind", "scheduler.grace_episodes", "scheduler.reduction_factor",
                "selection.top_k", "selection.test_episodes", "mlflow.experiment", "mlflow.registered_model", "name",
                "space.model.memory.slots.low", "space.model.memory.slots.high", "space.model.memory.slots.type",
                "space.model.memory.gamma.low", "space.model.memory.gamma.high", "space.train.lr.log",
                "space.model.memory.width.choices"]


@FAST
@given(path=st.sampled_from(SEARCH_PATHS), value=junk)
def test_mutated_search_config_fails_cleanly_naming_the_field(tmp_path_factory, path, value):
    src = yaml.safe_load((REPO / "configs" / "search" / "smoke.yaml").read_text())
    src["base"] = str(REPO / "configs" / "mann" / "smoke.yaml")
    node = src
    parts = path.split(".")
    if parts[0] == "space":
        node = src["space"][".".join(parts[1:-1])]
        parts = parts[-1:]
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    f = tmp_path_factory.mktemp("s") / "s.yaml"
    f.write_text(yaml.safe_dump(src))
    try:
        load_search_config(f)
    except ConfigError as exc:
        msg = str(exc)
        top = path.split(".")[0]
        assert msg.startswith(top) or msg.startswith("base") or "constraints" in msg.split(":")[0], msg


def run_cli(fn, argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = fn(argv)
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


arg = st.one_of(st.sampled_from(["--episodes", "--split", "--seed", "--checkpoint", "--json", "--set", "--config",
                                 "--steps", "--batch-size", "--device", "--data-dir", "-x", "--", "=", "nan"]),
                st.text(alphabet=string.printable, max_size=10))


@FAST
@given(cmd=st.sampled_from(["evaluate", "data", "bench", "train", "frob", ""]), args=st.lists(arg, max_size=6))
def test_mann_cli_never_tracebacks(tmp_path_factory, cmd, args):
    argv = [cmd, *args] if cmd else list(args)
    if cmd == "train":
        argv += ["--config", str(tmp_path_factory.mktemp("c") / "missing.yaml")]
    if cmd == "bench":
        argv += ["--device", "cuda"] if "--device" not in args else []
        argv += ["--config", str(tmp_path_factory.mktemp("c") / "missing.yaml")]
    if cmd == "data":
        argv += ["--data-dir", str(tmp_path_factory.mktemp("d") / "none")]
    if cmd == "evaluate":
        argv += ["--checkpoint", str(tmp_path_factory.mktemp("k") / "none.pt")]
    code, out, err = run_cli(mann_main, argv)
    assert code == 2, (argv, code, out, err)
    assert "Traceback" not in err and err.startswith("mann: error: ") and len(err.strip().splitlines()) == 1, err


@FAST
@given(cmd=st.sampled_from(["run", "resume", "status", "export", "select", "replay", "nope"]),
       args=st.lists(arg, max_size=4))
def test_search_cli_never_tracebacks(tmp_path_factory, cmd, args):
    missing = str(tmp_path_factory.mktemp("m") / "missing")
    argv = [cmd, *[a for a in args if not a.startswith("-")][:0], missing, *args]
    code, out, err = run_cli(search_main, argv)
    assert code == 2, (argv, code, out, err)
    assert "Traceback" not in err and err.startswith("mann-search: error: "), err


def test_a_study_that_never_started_a_damaged_replay_and_nothing_to_select_are_one_clear_line(tmp_path):
    """`mann-search resume` of a study folder without Tune state is refused before Ray starts; `replay` of a
    damaged MLflow replay file names the file and line; `select` with no finished trial names the study: each one
    line, exit 2, no traceback."""
    import ray

    from search.study import Study

    study = Study.create(load_search_config(REPO / "configs/search/smoke.yaml"), [], f"sqlite:///{tmp_path}/m.db",
                         path=str(tmp_path / "never"))
    study.save()
    code, _, err = run_cli(search_main, ["resume", study.path])
    assert code == 2 and "no Tune state to resume" in err and "Traceback" not in err, err
    assert not ray.is_initialized()  # refused before Ray was asked for
    bad = tmp_path / "mlflow-replay.jsonl"
    bad.write_text('{"tracking_uri": "sqlite:///x.db", "experiment": "e", "study": "s"}\n{"trial": "t1", "kind"\n')
    code, _, err = run_cli(search_main, ["replay", str(bad)])
    assert code == 2 and f"{bad}:2: not an MLflow replay record" in err and "Traceback" not in err, err
    code, _, err = run_cli(search_main, ["select", study.path])
    assert code == 2 and "no finished trial with a logged model" in err and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("mann-search: error: "), err  # (after MLflow's own DB lines)
