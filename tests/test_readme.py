"""The README's shell blocks run as written.

"Submitting to a Ray cluster (`ray job submit`)": the block is read from the README by its heading and run with
bash from the repository's root, with only these changes (each must match, so README and test cannot drift
apart):

- ``. .venv/bin/activate`` sources the venv that runs the tests (the install's ``.venv`` under ``.ci/run``), and
  PATH starts without it: the block's own activation is what must put ``ray`` and ``mann-search`` on PATH (for the
  nodes' workers and the job's entrypoint, which runs under ``/bin/sh``);
- the ports 6379 / 8265 / 52365 (the head's job agent: another cluster of the suite in the same network namespace
  holds Ray's default, and the Jobs API then finds no agent), the temp dirs ``/tmp/ray-h`` / ``/tmp/ray-w`` and the MLflow server 127.0.0.1:5000 become
  the test's own (free ports, a real ``mlflow server`` from conftest);
- the search is scaled down by ``--set`` on the block's ``mann-search run`` line (2 trials of 32 episodes; a key
  the block already sets gets the test's value in place);
- before ``ray job submit``, one line waits until the head's job agent has registered with the GCS: Ray's
  Jobs API waits only 10 s for the head's agent ("No available agent to submit job"), which a machine busy with
  the rest of the suite can exceed (a user just submits again);
- the final ``ray stop`` (which stops every Ray node of the machine) is replaced by stopping these two nodes by
  their processes' ids. A fresh ``RAY_AUTH_TOKEN`` in the environment is the token ``ray get-auth-token`` finds,
  so nothing is written to ``~/.ray``.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess

from .conftest import BIN, REPO, free_port, stop_and_clean

SECTION = "## Submitting to a Ray cluster (`ray job submit`)"

SCALE_DOWN = {
    "mlflow.experiment": "readme-ray-job", "budget.num_samples": 2, "budget.max_concurrent": 2,
    "resources.cpus_per_trial": 1, "overrides.train.episodes": 32, "overrides.train.eval_every": 16,
    "overrides.train.eval_episodes": 16, "scheduler.grace_episodes": 16, "sampler.n_startup_trials": 1,
    "selection.top_k": 1, "selection.test_episodes": 16,
}


def readme_block(heading: str) -> str:
    """The one ```bash block of the README section under ``heading`` (up to the next ``## `` heading)."""
    text = (REPO / "README.md").read_text()
    assert heading in text, f"README.md has no section {heading!r}"
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```bash\n(.*?)^```$", section, re.M | re.S)
    assert len(blocks) == 1, f"{heading}: expected one bash block, found {len(blocks)}"
    return blocks[0]


def substitute(script: str, pattern: str, replacement: str, count: int | None = None) -> str:
    new, n = re.subn(pattern, lambda _: replacement, script, flags=re.M)
    assert n and (count is None or n == count), f"README block: {pattern!r} matched {n} times"
    return new


def scale_down(script: str, settings: dict) -> str:
    """Give the block's `mann-search run` line the test's `--set`s: a key it already sets is replaced in place."""
    lines = script.replace("\\\n", " ").splitlines()  # one line per command
    (i,) = [n for n, line in enumerate(lines) if re.search(r"(^|\s)mann-search run ", line)]
    line = lines[i]
    for key, value in settings.items():
        pattern = rf"--set {re.escape(key)}=\S+"
        if re.search(pattern, line):
            line = re.sub(pattern, lambda _: f"--set {key}={value}", line)
        else:
            line += f" --set {key}={value}"
    lines[i] = line
    return "\n".join(lines) + "\n"


WAIT_FOR_AGENTS = """
import sys, time
import ray  # noqa: F401  (reads RAY_AUTH_MODE / RAY_AUTH_TOKEN)
from ray._private import ray_constants
from ray._raylet import GcsClient

# what the Jobs API looks up (ray.dashboard.modules.job.job_head._get_head_node_agent_once)
gcs, deadline = GcsClient(address=sys.argv[1]), time.monotonic() + 120
while True:
    head = gcs.internal_kv_get(ray_constants.KV_HEAD_NODE_ID_KEY, namespace=ray_constants.KV_NAMESPACE_JOB)
    if head and gcs.internal_kv_get(b"DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX:" + head, namespace=b"dashboard"):
        break
    if time.monotonic() > deadline:
        sys.exit("the head's job agent did not register within 120 s")
    time.sleep(0.5)
"""


def test_ray_job_submit_block_runs_as_written(tmp_path, mlflow_server, omniglot_dir):
    script = readme_block(SECTION)
    assert re.search(r"^\. \.venv/bin/activate\b", script, re.M), "the block activates the venv first"
    assert "export RAY_AUTH_MODE=token" in script
    gcs, dash = free_port(), free_port()
    head_tmp, worker_tmp = f"/tmp/ray-h{gcs}", f"/tmp/ray-w{gcs}"  # short: Ray's socket paths stay < 108 bytes
    script = substitute(script, r"^\. \.venv/bin/activate\b", f". {BIN}/activate", 1)
    script = substitute(script, r"\b6379\b", str(gcs), 2)
    script = substitute(script, r"\b8265\b", str(dash), 2)
    script = substitute(script, r"--dashboard-agent-listen-port=52365\b",
                        f"--dashboard-agent-listen-port={free_port()}", 1)
    script = substitute(script, r"--temp-dir=/tmp/ray-h\b", f"--temp-dir={head_tmp}", 1)
    script = substitute(script, r"--temp-dir=/tmp/ray-w\b", f"--temp-dir={worker_tmp}", 1)
    script = substitute(script, r"http://127\.0\.0\.1:5000\b", mlflow_server.uri, 1)
    script = substitute(script, r"^ray stop\s*\Z", "", 1)
    script = scale_down(script, {"storage": tmp_path / "runs", **SCALE_DOWN})
    (tmp_path / "wait_for_agents.py").write_text(WAIT_FOR_AGENTS)
    script = substitute(script, r"^(?=ray job submit )",
                        f"{BIN / 'python'} {tmp_path / 'wait_for_agents.py'} 127.0.0.1:{gcs}\n", 1)

    path = [p for p in os.environ["PATH"].split(os.pathsep) if p and os.path.realpath(p) != os.path.realpath(BIN)]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env |= {"PATH": os.pathsep.join(path), "MANN_DATA_DIR": str(omniglot_dir),
            "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0"}
    assert shutil.which("mann-search", path=env["PATH"]) is None, "PATH must not already hold mann-search"
    try:
        run = subprocess.run(["bash", "-e", "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=480)
        assert run.returncode == 0, f"{script}\n--- stdout\n{run.stdout[-6000:]}\n--- stderr\n{run.stderr[-3000:]}"
        assert re.search(r"Job 'raysubmit_\w+' succeeded", run.stdout), run.stdout[-3000:]

        # a client without the token is refused by the Jobs API
        anon = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
        refused = subprocess.run(
            [str(BIN / "ray"), "job", "list", "--address", f"http://127.0.0.1:{dash}"],
            env={**anon, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "no-token")}, capture_output=True, text=True,
            timeout=60)
        assert refused.returncode != 0, refused.stdout
    finally:
        leaked = stop_and_clean([worker_tmp, head_tmp], gcs)
    assert not leaked, f"Ray processes left running after the nodes were stopped: {sorted(leaked)}"

    import mlflow

    client = mlflow.MlflowClient(mlflow_server.uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "readme-ray-job"]
    runs = client.search_runs([experiment.experiment_id])
    roles = [r.data.tags.get("mann.role") for r in runs]
    assert roles.count("study") == 1 and roles.count("trial") == 2, roles
    study = next(r for r in runs if r.data.tags.get("mann.role") == "study")
    assert study.data.tags.get("mann.ray_job_id")
    for trial in (r for r in runs if r.data.tags.get("mann.role") == "trial"):
        outcome = trial.data.tags.get("mann.outcome")  # completed, or stopped early by ASHA (KILLED)
        assert outcome in ("completed", "early_stopped"), trial.data.tags
        assert trial.info.status == ("FINISHED" if outcome == "completed" else "KILLED"), trial.data.tags
        assert "val/acc_2plus" in trial.data.metrics
        # the quickstart's space and task (configs/search/quickstart.yaml), not a test config
        assert 8 <= int(trial.data.params["model.memory.slots"]) <= 64
        assert trial.data.params["task.classes"] == "3"
    assert list((tmp_path / "runs").glob("quickstart-*")), "the study's results are under the test's storage"
