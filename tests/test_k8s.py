"""Offline checks of k8s/, the Dockerfile and .dockerignore: no cluster, no network.

- every YAML document parses; RayCluster/RayJob validate against the KubeRay CRD schema
  (``../shared/k8s-crds``, or ``K8S_CRDS_DIR``), strictly (unknown fields are errors, as with
  ``kubectl apply``'s default field validation); built-in kinds, and the pod templates
  embedded in the Ray resources, validate with ``kubernetes-validate`` (strict) for the
  newest Kubernetes version it ships;
- the Ray version of the Dockerfile's base image, of every rayproject/ray image and of
  ``rayVersion`` matches the pin in pyproject.toml; the project image's tag is its version;
- no secret literals; Ray token auth on; nothing exposed outside the cluster; MLflow's
  ``--allowed-hosts`` accepts the Host headers its clients send; GPU limits and
  tolerations; autoscaling bounds; resources, labels, namespace, shared storage, RayJobs.

Each check is a function returning a list of problems. The tests assert the list is empty
for the files on disk, and ``test_check_catches`` breaks a copy of them on purpose, one
mutation per check, and asserts the check notices, so that no check can pass vacuously.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")
jsonschema = pytest.importorskip("jsonschema")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

from packaging.requirements import Requirement  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
CRDS = Path(os.environ.get("K8S_CRDS_DIR", ROOT.parent / "shared" / "k8s-crds"))
NS = "lstm-pipeline"
PROJECT_IMAGE = "ghcr.io/OWNER/lstm-pipeline"
SECRETS_EXAMPLE = "secrets.example.yaml"
SHARED = "/mnt/shared"
PLACEHOLDER = "REPLACE_ME"
ENTRYPOINTS = {
    "rayjob-train.yaml": "pipeline train data=multi30k data.root=/mnt/shared/multi30k train.num_workers=4 "
    "train.use_gpu=true train=gpu model=large train.storage_path=/mnt/shared/ray_results data.output_dir=/mnt/shared/data",
    "rayjob-sweep.yaml": "pipeline tune data=multi30k data.root=/mnt/shared/multi30k tune=hidden_depth "
    "train.use_gpu=true train.storage_path=/mnt/shared/ray_results data.output_dir=/mnt/shared/data",
}
# Files `kubectl apply -k k8s/` must not create: templates, and jobs that start work.
NOT_IN_KUSTOMIZATION = {SECRETS_EXAMPLE, "rayjob-train.yaml", "rayjob-sweep.yaml"}
CLUSTER_SCOPED = {
    "Namespace",
    "StorageClass",
    "ClusterRole",
    "ClusterRoleBinding",
    "PersistentVolume",
}
EXPOSING_KINDS = {"Ingress", "Route", "Gateway", "HTTPRoute", "IngressRoute", "VirtualService"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|KEY", re.IGNORECASE)
URI_WITH_CREDENTIALS = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@", re.IGNORECASE)
RAY_IMAGE = re.compile(r"^(?:docker\.io/)?rayproject/ray(?:-ml|-llm)?:(?P<version>\d+\.\d+\.\d+)(?:-\S*)?$")
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# Importing mlflow.server (for its Host check) configures SQLAlchemy mappers, which warns.
pytestmark = pytest.mark.filterwarnings("ignore:.*noload.*:DeprecationWarning")

Bundle = dict[str, Any]  # texts, docs, dockerfile, dockerignore, pyproject


# ---------------------------------------------------------------------------- loading


def parse_texts(texts: dict[str, str]) -> tuple[dict[str, list[dict]], list[str]]:
    docs, errors = {}, []
    for name, text in texts.items():
        try:
            docs[name] = [d for d in yaml.load_all(text, Loader=Loader) if d is not None]
        except yaml.YAMLError as e:
            errors.append(f"{name}: does not parse: {e}")
            continue
        for i, d in enumerate(docs[name]):
            if not isinstance(d, dict) or not d.get("apiVersion") or not d.get("kind"):
                errors.append(f"{name}[{i}]: not a Kubernetes object (apiVersion and kind)")
    return docs, errors


def load_bundle() -> Bundle:
    texts = {p.name: p.read_text() for p in sorted(K8S.glob("*.yaml"))}
    docs, errors = parse_texts(texts)
    assert not errors, errors
    return {
        "texts": texts,
        "docs": docs,
        "dockerfile": (ROOT / "Dockerfile").read_text(),
        "dockerignore": (ROOT / ".dockerignore").read_text(),
        "pyproject": tomllib.loads((ROOT / "pyproject.toml").read_text()),
    }


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return load_bundle()


def objects(b: Bundle, kind: str | None = None, skip_example: bool = False) -> Iterator[tuple[str, dict]]:
    for name, ds in b["docs"].items():
        if skip_example and name == SECRETS_EXAMPLE:
            continue
        for i, d in enumerate(ds):
            if kind is None or d.get("kind") == kind:
                yield f"{name}[{i}] {d.get('kind')}/{d.get('metadata', {}).get('name')}", d


def ray_cluster_specs(b: Bundle) -> Iterator[tuple[str, dict]]:
    """The RayCluster spec and every RayJob's rayClusterSpec."""
    for where, d in objects(b, "RayCluster"):
        yield where, d.get("spec") or {}
    for where, d in objects(b, "RayJob"):
        if "rayClusterSpec" in (d.get("spec") or {}):
            yield where + " rayClusterSpec", d["spec"]["rayClusterSpec"]


def ray_pod_templates(where: str, spec: dict) -> Iterator[tuple[str, dict]]:
    yield f"{where} head", spec.get("headGroupSpec", {}).get("template", {})
    for g in spec.get("workerGroupSpecs") or []:
        yield f"{where} group {g.get('groupName')}", g.get("template", {})


def pod_templates(b: Bundle) -> Iterator[tuple[str, dict]]:
    """Every pod template of every object (Deployments, StatefulSets, Ray groups, submitters)."""
    for where, d in objects(b):
        spec = d.get("spec") or {}
        if d["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}:
            yield where, spec.get("template", {})
        if d["kind"] == "RayJob" and "submitterPodTemplate" in spec:
            yield where + " submitter", spec["submitterPodTemplate"]
    for where, spec in ray_cluster_specs(b):
        yield from ray_pod_templates(where, spec)


def containers(b: Bundle) -> Iterator[tuple[str, dict]]:
    for where, tpl in pod_templates(b):
        pod = tpl.get("spec") or {}
        for c in (pod.get("initContainers") or []) + (pod.get("containers") or []):
            yield f"{where} container {c.get('name')}", c
    for where, spec in ray_cluster_specs(b):
        if spec.get("enableInTreeAutoscaling"):  # the operator injects this sidecar
            yield f"{where} autoscaler", spec.get("autoscalerOptions") or {}


def strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from strings(v)


def pinned_ray(b: Bundle):
    for dep in b["pyproject"]["project"]["dependencies"]:
        req = Requirement(dep)
        if req.name == "ray":
            return req.specifier
    raise AssertionError("pyproject.toml does not depend on ray")


def command_line(c: dict) -> list[str]:
    return [str(x) for x in (c.get("command") or []) + (c.get("args") or [])]


def flag_value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def quantity(q: Any) -> float:
    s = str(q)
    units = {
        "m": 1e-3,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
    }
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", s)
    if not m or (m.group(2) and m.group(2) not in units):
        raise ValueError(f"not a quantity: {q!r}")
    return float(m.group(1)) * units.get(m.group(2), 1)


# ---------------------------------------------------------------------------- schemas


def _strict(schema: Any) -> Any:
    """CRD schema -> JSON Schema that rejects unknown fields, like the API server does.

    controller-gen omits additionalProperties; the API server prunes (and kubectl's strict
    field validation rejects) fields not in ``properties`` unless x-kubernetes-preserve-
    unknown-fields is set. The x-kubernetes-* keywords themselves (int-or-string, list-type,
    ...) mean nothing to jsonschema and are ignored; int-or-string fields already carry
    ``anyOf: [integer, string]``.
    """
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crd_schemas() -> dict[str, dict]:
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRDS} (set K8S_CRDS_DIR)")
    out = {}
    for kind, file in [
        ("RayCluster", "ray.io_rayclusters.yaml"),
        ("RayJob", "ray.io_rayjobs.yaml"),
    ]:
        crd = yaml.load((CRDS / file).read_text(), Loader=Loader)  # noqa: S506 (Loader is a SafeLoader)
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        out[kind] = _strict(v1["schema"]["openAPIV3Schema"])
    return out


def check_crd_schema(b: Bundle, schemas: dict[str, dict]) -> list[str]:
    errors = []
    for kind, schema in schemas.items():
        validator = jsonschema.Draft202012Validator(schema)
        for where, d in objects(b, kind):
            if d["apiVersion"] != "ray.io/v1":
                errors.append(f"{where}: apiVersion {d['apiVersion']}, want ray.io/v1")
            for e in validator.iter_errors(d):
                errors.append(f"{where}: {'.'.join(map(str, e.absolute_path))}: {e.message}")
    return errors


K8S_VERSION = kubernetes_validate.latest_version()


def _k8s_validate(where: str, obj: dict) -> list[str]:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{where}: {'.'.join(map(str, e.path))}: {e.message} (Kubernetes {K8S_VERSION})"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"{where}: {e.message}"]
    return []


def check_builtin_schema(b: Bundle) -> list[str]:
    errors, seen = [], set()
    for where, d in objects(b):
        if d["apiVersion"].startswith(("ray.io/", "kustomize.config.k8s.io/")):
            continue
        seen.add(d["kind"])
        errors += _k8s_validate(where, d)
    # The Ray CRDs embed pod templates without field validation of their own depth;
    # check them as core/v1 PodTemplates too.
    for where, spec in ray_cluster_specs(b):
        for w, tpl in ray_pod_templates(where, spec):
            errors += _k8s_validate(
                w,
                {
                    "apiVersion": "v1",
                    "kind": "PodTemplate",
                    "metadata": {"name": "t"},
                    "template": tpl,
                },
            )
    for where, d in objects(b, "RayJob"):
        if "submitterPodTemplate" in d["spec"]:
            tpl = d["spec"]["submitterPodTemplate"]
            errors += _k8s_validate(
                where + " submitter",
                {
                    "apiVersion": "v1",
                    "kind": "PodTemplate",
                    "metadata": {"name": "t"},
                    "template": tpl,
                },
            )
    for kind in [
        "Deployment",
        "Service",
        "StatefulSet",
        "PersistentVolumeClaim",
        "Secret",
        "Namespace",
    ]:
        if kind not in seen:
            errors.append(f"no {kind} in k8s/")
    return errors


# ---------------------------------------------------------------------------- checks


def check_parse(b: Bundle) -> list[str]:
    docs, errors = parse_texts(b["texts"])
    if not docs:
        errors.append("no YAML files in k8s/")
    return errors


def check_versions(b: Bundle) -> list[str]:
    errors = []
    spec = pinned_ray(b)
    project_version = b["pyproject"]["project"]["version"]
    froms = re.findall(r"^\s*FROM\s+(?:--\S+\s+)*(\S+)", b["dockerfile"], re.MULTILINE | re.IGNORECASE)
    if not froms:
        errors.append("Dockerfile: no FROM")
    for image in froms[:1] or []:
        m = RAY_IMAGE.match(image)
        if not m:
            errors.append(f"Dockerfile: FROM {image} is not a rayproject/ray:<version> image")
        elif m["version"] not in spec:
            errors.append(f"Dockerfile: FROM {image}: Ray {m['version']} does not match pyproject's ray{spec}")
    n_project = 0
    for where, c in containers(b):
        image = c.get("image")
        if image is None:
            continue
        m = RAY_IMAGE.match(image)
        if m and m["version"] not in spec:
            errors.append(f"{where}: {image}: Ray {m['version']} does not match pyproject's ray{spec}")
        if image.split(":")[0] == PROJECT_IMAGE:
            n_project += 1
            tag = image.split(":", 1)[1] if ":" in image else ""
            if tag != project_version:
                errors.append(f"{where}: {image}: tag must be the project version {project_version}")
    for where, rc in ray_cluster_specs(b):
        if str(rc.get("rayVersion")) not in spec or not re.fullmatch(r"\d+\.\d+\.\d+", str(rc.get("rayVersion"))):
            errors.append(f"{where}: rayVersion {rc.get('rayVersion')!r} does not match pyproject's ray{spec}")
    if not n_project:
        errors.append(f"no container runs the project image {PROJECT_IMAGE}")
    return errors


def check_no_secret_literals(b: Bundle) -> list[str]:
    errors = []
    for where, c in containers(b):
        for env in c.get("env") or []:
            name = env.get("name", "")
            ref = (env.get("valueFrom") or {}).get("secretKeyRef")
            if SECRET_NAME.search(name) and not ref:
                errors.append(f"{where}: env {name} must come from valueFrom.secretKeyRef")
            if "value" in env and URI_WITH_CREDENTIALS.search(str(env["value"])):
                errors.append(f"{where}: env {name} holds a URI with credentials; use a secretKeyRef")
    for where, d in objects(b, skip_example=True):
        if d["kind"] == "Secret":
            errors.append(f"{where}: Secrets with values belong in the cluster, not in k8s/ (see {SECRETS_EXAMPLE})")
            continue
        for s in strings(d):
            if URI_WITH_CREDENTIALS.search(s):
                errors.append(f"{where}: a URI with credentials in {s!r}")
    examples = list(objects(b, "Secret"))
    if not examples:
        errors.append(f"{SECRETS_EXAMPLE}: no Secret templates")
    for where, d in examples:
        values = {**(d.get("stringData") or {}), **(d.get("data") or {})}
        if d.get("data"):
            errors.append(f"{where}: use stringData placeholders, not base64 data")
        for key, value in values.items():
            if PLACEHOLDER not in str(value):
                errors.append(f"{where}: {key} must be a {PLACEHOLDER} placeholder, got {value!r}")
    return errors


def check_ray_auth(b: Bundle) -> list[str]:
    errors = []
    secret_keys = {
        d["metadata"]["name"]: set((d.get("stringData") or {}) | (d.get("data") or {})) for _, d in objects(b, "Secret")
    }
    specs = list(ray_cluster_specs(b))
    if not specs:
        errors.append("no Ray cluster specs")
    for where, spec in specs:
        auth = spec.get("authOptions") or {}
        if auth.get("mode") != "token":
            errors.append(f"{where}: authOptions.mode must be token, got {auth.get('mode')!r}")
        name = auth.get("secretName")
        if not name:
            errors.append(f"{where}: authOptions.secretName must name the pre-created token Secret")
        elif "auth_token" not in secret_keys.get(name, set()):
            errors.append(f"{where}: Secret {name} with key auth_token is not in {SECRETS_EXAMPLE}")
    for where, c in containers(b):
        for env in c.get("env") or []:
            if env.get("name") == "RAY_AUTH_MODE" and env.get("value") != "token":
                errors.append(f"{where}: RAY_AUTH_MODE={env.get('value')!r} turns token auth off")
    return errors


def check_no_exposure(b: Bundle) -> list[str]:
    errors = []
    for where, d in objects(b):
        if d["kind"] in EXPOSING_KINDS:
            errors.append(f"{where}: {d['kind']} exposes a service outside the cluster")
        if d["kind"] == "Service" and d.get("spec", {}).get("type", "ClusterIP") != "ClusterIP":
            errors.append(f"{where}: Service type {d['spec']['type']}, want ClusterIP")
    for where, spec in ray_cluster_specs(b):
        head = spec.get("headGroupSpec") or {}
        if head.get("serviceType", "ClusterIP") != "ClusterIP":
            errors.append(f"{where}: headGroupSpec.serviceType {head['serviceType']}, want ClusterIP")
        if (head.get("headService") or {}).get("spec", {}).get("type", "ClusterIP") != "ClusterIP":
            errors.append(f"{where}: headGroupSpec.headService must stay ClusterIP")
        if head.get("enableIngress"):
            errors.append(f"{where}: enableIngress exposes the dashboard")
    for where, tpl in pod_templates(b):
        if (tpl.get("spec") or {}).get("hostNetwork"):
            errors.append(f"{where}: hostNetwork exposes every port on the node")
    for where, c in containers(b):
        for p in c.get("ports") or []:
            if p.get("hostPort"):
                errors.append(f"{where}: hostPort {p['hostPort']} exposes the port on the node")
    return errors


def check_mlflow(b: Bundle) -> list[str]:
    from mlflow.server.security_utils import is_allowed_host_header

    errors = []
    services = {d["metadata"]["name"]: d for _, d in objects(b, "Service")}
    svc = services.get("mlflow")
    if not svc:
        return ["no Service named mlflow"]
    ns = svc["metadata"].get("namespace", NS)
    port = next((p["port"] for p in svc["spec"].get("ports", []) if p.get("port") == 5000), None)
    if port is None:
        errors.append("Service mlflow: no port 5000")
    deployments = [(w, d) for w, d in objects(b, "Deployment") if d["metadata"]["name"] == "mlflow"]
    if not deployments:
        return errors + ["no Deployment named mlflow"]
    ((where, dep),) = deployments
    server = [c for c in dep["spec"]["template"]["spec"]["containers"] if "server" in command_line(c)]
    if not server:
        return errors + [f"{where}: no container runs `mlflow server`"]
    argv = command_line(server[0])
    env = {e["name"]: e for e in server[0].get("env") or []}
    allowed = flag_value(argv, "--allowed-hosts")
    if not allowed:
        return errors + [f"{where}: mlflow server without --allowed-hosts"]
    hosts = [h.strip() for h in allowed.split(",")]
    if "*" in hosts:
        errors.append(f"{where}: --allowed-hosts '*' disables the DNS-rebinding check")
    if "mlflow" not in hosts:
        errors.append(f"{where}: --allowed-hosts must include the Service name mlflow")
    # The Host headers real clients send: in-cluster clients by Service name, people via port-forward.
    wanted = [f"{n}:{port}" for n in ("mlflow", f"mlflow.{ns}.svc", f"mlflow.{ns}.svc.cluster.local")]
    wanted += ["127.0.0.1:5000", "localhost:5000"]
    for _, c in containers(b):
        for e in c.get("env") or []:
            if e.get("name") == "MLFLOW_TRACKING_URI" and "value" in e:
                u = urlsplit(e["value"])
                wanted.append(u.netloc)
                if (
                    u.hostname
                    not in (
                        "mlflow",
                        f"mlflow.{ns}",
                        f"mlflow.{ns}.svc",
                        f"mlflow.{ns}.svc.cluster.local",
                    )
                    or u.port != port
                ):
                    errors.append(f"MLFLOW_TRACKING_URI {e['value']} is not the mlflow Service (port {port})")
    for host in dict.fromkeys(wanted):
        if not is_allowed_host_header(hosts, host):
            errors.append(f"{where}: --allowed-hosts rejects Host {host!r}")
    if "--serve-artifacts" not in argv or not flag_value(argv, "--artifacts-destination"):
        errors.append(f"{where}: want --serve-artifacts and --artifacts-destination")
    backend = flag_value(argv, "--backend-store-uri")
    var = (
        backend[2:-1]
        if backend and backend.startswith("$(")
        else "BACKEND_URI"
        if backend
        else "MLFLOW_BACKEND_STORE_URI"
    )
    if backend and not backend.startswith("$("):
        errors.append(f"{where}: --backend-store-uri must come from a Secret, got a literal")
    elif not (env.get(var, {}).get("valueFrom") or {}).get("secretKeyRef"):
        errors.append(f"{where}: the backend store URI ({var}) must come from a secretKeyRef")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"):
        if not (env.get(key, {}).get("valueFrom") or {}).get("secretKeyRef"):
            errors.append(f"{where}: {key} must come from a secretKeyRef")
    for where_spec, spec in ray_cluster_specs(b):  # every Ray container logs to this server
        for w, tpl in ray_pod_templates(where_spec, spec):
            for c in (tpl.get("spec") or {}).get("containers") or []:
                if not any(e.get("name") == "MLFLOW_TRACKING_URI" for e in c.get("env") or []):
                    errors.append(f"{w} container {c.get('name')}: MLFLOW_TRACKING_URI not set")
    return errors


def _gpu_groups(spec: dict) -> Iterator[tuple[dict, dict]]:
    for g in spec.get("workerGroupSpecs") or []:
        for c in (g.get("template", {}).get("spec") or {}).get("containers") or []:
            limits = (c.get("resources") or {}).get("limits") or {}
            if "nvidia.com/gpu" in limits:
                yield g, c


def check_gpu(b: Bundle) -> list[str]:
    errors = []
    for where, spec in ray_cluster_specs(b):
        groups = list(_gpu_groups(spec))
        if not groups:
            errors.append(f"{where}: no worker group with nvidia.com/gpu limits")
        for g, c in groups:
            res = c.get("resources") or {}
            n = res["limits"]["nvidia.com/gpu"]
            if not isinstance(n, int) or n < 1:
                errors.append(f"{where} group {g['groupName']}: nvidia.com/gpu limit {n!r}")
            if "nvidia.com/gpu" in (res.get("requests") or {}) and res["requests"]["nvidia.com/gpu"] != n:
                errors.append(f"{where} group {g['groupName']}: GPU requests must equal limits")
            tols = (g.get("template", {}).get("spec") or {}).get("tolerations") or []
            if not any(
                t.get("key") == "nvidia.com/gpu"
                and t.get("effect") in (None, "", "NoSchedule")
                and t.get("operator", "Equal") in ("Exists", "Equal")
                for t in tols
            ):
                errors.append(f"{where} group {g['groupName']}: no toleration for nvidia.com/gpu:NoSchedule")
    return errors


def check_autoscaling(b: Bundle) -> list[str]:
    errors = []
    for where, spec in ray_cluster_specs(b):
        if spec.get("enableInTreeAutoscaling") is not True:
            errors.append(f"{where}: enableInTreeAutoscaling must be true")
        groups = spec.get("workerGroupSpecs") or []
        if not any(g.get("groupName") for g, _ in _gpu_groups(spec)) or len(groups) < 2:
            errors.append(f"{where}: want a CPU and a GPU worker group")
        for g in groups:
            lo, hi, n = (
                g.get("minReplicas"),
                g.get("maxReplicas"),
                g.get("replicas", g.get("minReplicas")),
            )
            if not isinstance(lo, int) or not isinstance(hi, int):
                errors.append(f"{where} group {g.get('groupName')}: minReplicas and maxReplicas must be set")
            elif not (0 <= lo <= (n if isinstance(n, int) else lo) <= hi) or hi < 1 or hi == lo:
                errors.append(
                    f"{where} group {g.get('groupName')}: want 0 <= min ({lo}) <= replicas ({n}) <= max ({hi}), max > min"
                )
    return errors


def check_resources(b: Bundle) -> list[str]:
    errors = []
    for where, c in containers(b):
        res = c.get("resources") or {}
        for part in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in (res.get(part) or {}):
                    errors.append(f"{where}: resources.{part}.{r} missing")
        for r in ("cpu", "memory"):
            try:
                if (
                    r in (res.get("requests") or {})
                    and r in (res.get("limits") or {})
                    and quantity(res["requests"][r]) > quantity(res["limits"][r])
                ):
                    errors.append(f"{where}: {r} request above limit")
            except ValueError as e:
                errors.append(f"{where}: {e}")
    return errors


def check_labels_namespace(b: Bundle) -> list[str]:
    errors = []
    if not any(d["metadata"]["name"] == NS for _, d in objects(b, "Namespace")):
        errors.append(f"no Namespace {NS}")
    for where, d in objects(b):
        if d["kind"] == "Kustomization":
            if d.get("namespace") != NS:
                errors.append(f"{where}: namespace must be {NS}")
            continue
        labels = d.get("metadata", {}).get("labels") or {}
        if not labels.get("app.kubernetes.io/name") or labels.get("app.kubernetes.io/part-of") != NS:
            errors.append(f"{where}: labels app.kubernetes.io/name and app.kubernetes.io/part-of={NS} required")
        if d["kind"] not in CLUSTER_SCOPED and d["metadata"].get("namespace") != NS:
            errors.append(f"{where}: namespace must be {NS}, got {d['metadata'].get('namespace')!r}")
    for where, tpl in pod_templates(b):
        labels = (tpl.get("metadata") or {}).get("labels") or {}
        if not labels.get("app.kubernetes.io/name") or labels.get("app.kubernetes.io/part-of") != NS:
            errors.append(f"{where}: pod template labels app.kubernetes.io/name and part-of required")
    return errors


def check_shared_storage(b: Bundle) -> list[str]:
    errors = []
    pvcs = {d["metadata"]["name"]: d for _, d in objects(b, "PersistentVolumeClaim")}
    rwx = {n for n, d in pvcs.items() if "ReadWriteMany" in d["spec"].get("accessModes", [])}
    if not rwx:
        errors.append("no ReadWriteMany PersistentVolumeClaim")
    if "storage.yaml" not in b["docs"] or not any(
        d.get("kind") == "PersistentVolumeClaim" for d in b["docs"]["storage.yaml"]
    ):
        errors.append("storage.yaml must hold the shared PersistentVolumeClaim")
    for where, spec in ray_cluster_specs(b):
        for w, tpl in ray_pod_templates(where, spec):
            pod = tpl.get("spec") or {}
            claims = {
                v["name"]: (v.get("persistentVolumeClaim") or {}).get("claimName") for v in pod.get("volumes") or []
            }
            for c in pod.get("containers") or []:
                mounts = [m for m in c.get("volumeMounts") or [] if m.get("mountPath") == SHARED]
                if not mounts or claims.get(mounts[0]["name"]) not in rwx:
                    errors.append(f"{w} container {c.get('name')}: must mount an RWX PVC at {SHARED}")
    for where, d in objects(b, "RayJob"):
        args = shlex.split(d["spec"].get("entrypoint", ""))
        for key in ("data.root", "train.storage_path", "data.output_dir"):
            vals = [a.split("=", 1)[1] for a in args if a.startswith(key + "=")]
            if not vals or not vals[-1].startswith(SHARED + "/"):
                errors.append(f"{where}: entrypoint must set {key}=<under {SHARED}>")
    return errors


def check_rayjobs(b: Bundle) -> list[str]:
    from pipeline import config

    errors = []
    clusters = [d for _, d in objects(b, "RayCluster")]
    if len(clusters) != 1:
        return [f"want one RayCluster, found {len(clusters)}"]
    for file, entrypoint in ENTRYPOINTS.items():
        jobs = [d for d in b["docs"].get(file, []) if d.get("kind") == "RayJob"]
        if len(jobs) != 1:
            errors.append(f"{file}: want one RayJob")
            continue
        spec = jobs[0]["spec"]
        if spec.get("entrypoint") != entrypoint:
            errors.append(f"{file}: entrypoint must be {entrypoint!r}")
        if spec.get("shutdownAfterJobFinishes") is not True:
            errors.append(f"{file}: shutdownAfterJobFinishes must be true")
        if not isinstance(spec.get("ttlSecondsAfterFinished"), int) or spec["ttlSecondsAfterFinished"] <= 0:
            errors.append(f"{file}: ttlSecondsAfterFinished must be a positive integer")
        if ("rayClusterSpec" in spec) == bool(spec.get("clusterSelector")):
            errors.append(f"{file}: want exactly one of rayClusterSpec and clusterSelector")
        if "rayClusterSpec" in spec and spec["rayClusterSpec"] != clusters[0]["spec"]:
            errors.append(f"{file}: rayClusterSpec differs from raycluster.yaml's spec")
        # The overrides must name real config keys and options (tune= once that group exists).
        overrides = [
            a
            for a in shlex.split(spec.get("entrypoint", ""))[2:]
            if "tune" in config.GROUPS or not a.startswith(("tune=", "tune."))
        ]
        try:
            config.load_config(overrides)
        except config.ConfigError as e:
            errors.append(f"{file}: entrypoint overrides: {e}")
    return errors


def check_kustomization(b: Bundle) -> list[str]:
    errors = []
    kust = b["docs"].get("kustomization.yaml")
    if not kust:
        return ["no k8s/kustomization.yaml"]
    listed = kust[0].get("resources") or []
    for r in listed:
        if r not in b["texts"]:
            errors.append(f"kustomization.yaml lists {r}, which is not in k8s/")
    for name in b["texts"]:
        if name == "kustomization.yaml":
            continue
        if name in NOT_IN_KUSTOMIZATION and name in listed:
            errors.append(f"kustomization.yaml must not list {name}")
        if name not in NOT_IN_KUSTOMIZATION and name not in listed:
            errors.append(f"kustomization.yaml does not list {name}")
    return errors


def check_dockerfile(b: Bundle) -> list[str]:
    errors = []
    text = b["dockerfile"]
    lines = [
        ln.strip() for ln in re.sub(r"\\\n", " ", text).splitlines() if ln.strip() and not ln.strip().startswith("#")
    ]
    env = " ".join(ln for ln in lines if ln.upper().startswith("ENV "))
    if not re.search(r"\bPIPELINE_CONF_DIR=/app/conf\b", env):
        errors.append("Dockerfile: want ENV PIPELINE_CONF_DIR=/app/conf")
    if not any(re.fullmatch(r"WORKDIR\s+/app/?", ln, re.IGNORECASE) for ln in lines):
        errors.append("Dockerfile: want WORKDIR /app")
    copies = " ".join(ln for ln in lines if ln.upper().startswith(("COPY ", "ADD ")))
    for src in ("pyproject.toml", "pipeline", "conf"):
        if not re.search(rf"(?<![\w./-]){re.escape(src)}/?(?![\w.-])", copies):
            errors.append(f"Dockerfile: does not copy {src}")
    if not any(re.search(r"pip install\b.*--no-cache-dir.*\s/app/?(\s|$)", ln) for ln in lines):
        errors.append("Dockerfile: want `pip install --no-cache-dir /app`")
    ignored = {ln.strip().strip("/") for ln in b["dockerignore"].splitlines() if ln.strip() and not ln.startswith("#")}
    for entry in (
        ".git",
        ".venv",
        "artifacts",
        "ray_results",
        "mlruns",
        "mlflow.db",
        "data",
        ".pytest_cache",
    ):
        if entry not in ignored:
            errors.append(f".dockerignore: does not exclude {entry}")
    return errors


CHECKS: dict[str, Callable[..., list[str]]] = {
    "parse": check_parse,
    "builtin_schema": check_builtin_schema,
    "versions": check_versions,
    "no_secret_literals": check_no_secret_literals,
    "ray_auth": check_ray_auth,
    "no_exposure": check_no_exposure,
    "mlflow": check_mlflow,
    "gpu": check_gpu,
    "autoscaling": check_autoscaling,
    "resources": check_resources,
    "labels_namespace": check_labels_namespace,
    "shared_storage": check_shared_storage,
    "rayjobs": check_rayjobs,
    "kustomization": check_kustomization,
    "dockerfile": check_dockerfile,
}


# ---------------------------------------------------------------------------- tests


def test_crd_schema(bundle, crd_schemas):
    assert {d["kind"] for _, d in objects(bundle)} >= {"RayCluster", "RayJob"}
    assert check_crd_schema(bundle, crd_schemas) == []


@pytest.mark.parametrize("name", list(CHECKS))
def test_check(bundle, name):
    assert CHECKS[name](bundle) == []


def test_kustomize_build():
    """`kubectl kustomize` (offline) renders the kustomization, when kubectl is installed."""
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not installed")
    out = subprocess.run([kubectl, "kustomize", str(K8S)], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    kinds = {d["kind"] for d in yaml.load_all(out.stdout, Loader=Loader) if d}
    assert kinds >= {
        "Namespace",
        "PersistentVolumeClaim",
        "Deployment",
        "StatefulSet",
        "Service",
        "RayCluster",
    }
    assert "Secret" not in kinds and "RayJob" not in kinds


# -------------------------------------------------- every check fails on a broken copy


def _cluster(b):
    return b["docs"]["raycluster.yaml"][0]["spec"]


def _gpu_group(b):
    return next(g for g in _cluster(b)["workerGroupSpecs"] if g["groupName"] == "gpu")


def _mlflow_container(b):
    dep = next(d for d in b["docs"]["mlflow.yaml"] if d["kind"] == "Deployment")
    return dep["spec"]["template"]["spec"]["containers"][0]


def _set_flag(c, flag, value):
    c["command"] = [a for a in c["command"] if not a.startswith(flag)] + [f"{flag}={value}"]


def _env(c, name):
    return next(e for e in c["env"] if e["name"] == name)


MUTATIONS: list[tuple[str, str, Callable[[Bundle], Any]]] = [
    ("crd", "unknown field", lambda b: _gpu_group(b).update(minReplica=0)),
    ("crd", "wrong type", lambda b: _gpu_group(b).update(maxReplicas="4")),
    ("crd", "bad enum", lambda b: _cluster(b)["authOptions"].update(mode="on")),
    ("parse", "broken YAML", lambda b: b["texts"].update({"storage.yaml": "spec: [unclosed"})),
    ("builtin_schema", "unknown container field", lambda b: _mlflow_container(b).update(cmd=["x"])),
    (
        "builtin_schema",
        "unknown field in a Ray pod template",
        lambda b: _gpu_group(b)["template"]["spec"]["containers"][0].update(resource={}),
    ),
    (
        "versions",
        "Dockerfile on another Ray",
        lambda b: b.update(dockerfile=b["dockerfile"].replace("ray:2.60.0", "ray:2.59.0")),
    ),
    ("versions", "rayVersion drift", lambda b: _cluster(b).update(rayVersion="2.59.0")),
    (
        "versions",
        "a rayproject/ray image of another Ray",
        lambda b: _gpu_group(b)["template"]["spec"]["containers"][0].update(image="rayproject/ray:2.59.0-py311-gpu"),
    ),
    (
        "versions",
        "project image tag",
        lambda b: _gpu_group(b)["template"]["spec"]["containers"][0].update(image=PROJECT_IMAGE + ":latest"),
    ),
    (
        "no_secret_literals",
        "literal password",
        lambda b: _mlflow_container(b)["env"].append({"name": "DB_PASSWORD", "value": "hunter2"}),
    ),
    (
        "no_secret_literals",
        "URI with credentials",
        lambda b: _env(_mlflow_container(b), "MLFLOW_BACKEND_STORE_URI").update(
            value="postgresql://u:p@db/x", valueFrom=None
        ),
    ),
    (
        "no_secret_literals",
        "real value in the example",
        lambda b: b["docs"][SECRETS_EXAMPLE][0]["stringData"].update(auth_token="3f9a8c"),
    ),
    ("ray_auth", "auth off", lambda b: _cluster(b)["authOptions"].update(mode="disabled")),
    (
        "ray_auth",
        "no authOptions",
        lambda b: b["docs"]["rayjob-train.yaml"][0]["spec"]["rayClusterSpec"].pop("authOptions"),
    ),
    (
        "ray_auth",
        "env turns it off",
        lambda b: _gpu_group(b)["template"]["spec"]["containers"][0]["env"].append(
            {"name": "RAY_AUTH_MODE", "value": "disabled"}
        ),
    ),
    (
        "no_exposure",
        "LoadBalancer head",
        lambda b: _cluster(b)["headGroupSpec"].update(serviceType="LoadBalancer"),
    ),
    (
        "no_exposure",
        "NodePort MLflow",
        lambda b: next(d for d in b["docs"]["mlflow.yaml"] if d["kind"] == "Service")["spec"].update(type="NodePort"),
    ),
    (
        "no_exposure",
        "an Ingress",
        lambda b: b["docs"]["raycluster.yaml"].append(
            {
                "apiVersion": "networking.k8s.io/v1",
                "kind": "Ingress",
                "metadata": {"name": "ray-dashboard"},
            }
        ),
    ),
    (
        "mlflow",
        "allowed hosts without the Service",
        lambda b: _set_flag(_mlflow_container(b), "--allowed-hosts", "localhost:*"),
    ),
    (
        "mlflow",
        "hosts without port",
        lambda b: _set_flag(
            _mlflow_container(b),
            "--allowed-hosts",
            "mlflow,mlflow.lstm-pipeline.svc,localhost,127.0.0.1",
        ),
    ),
    (
        "mlflow",
        "tracking URI elsewhere",
        lambda b: _env(_gpu_group(b)["template"]["spec"]["containers"][0], "MLFLOW_TRACKING_URI").update(
            value="http://mlflow-x:5000"
        ),
    ),
    (
        "mlflow",
        "literal backend URI",
        lambda b: _set_flag(_mlflow_container(b), "--backend-store-uri", "sqlite:///x.db"),
    ),
    ("gpu", "no toleration", lambda b: _gpu_group(b)["template"]["spec"].pop("tolerations")),
    (
        "gpu",
        "no GPU limit",
        lambda b: _gpu_group(b)["template"]["spec"]["containers"][0]["resources"]["limits"].pop("nvidia.com/gpu"),
    ),
    ("autoscaling", "autoscaler off", lambda b: _cluster(b).update(enableInTreeAutoscaling=False)),
    ("autoscaling", "min above max", lambda b: _gpu_group(b).update(minReplicas=5)),
    ("autoscaling", "no bounds", lambda b: _gpu_group(b).pop("maxReplicas")),
    ("resources", "no limits", lambda b: _mlflow_container(b)["resources"].pop("limits")),
    (
        "resources",
        "request above limit",
        lambda b: _gpu_group(b)["template"]["spec"]["containers"][0]["resources"]["requests"].update(memory="500Gi"),
    ),
    (
        "labels_namespace",
        "no part-of",
        lambda b: b["docs"]["storage.yaml"][0]["metadata"]["labels"].pop("app.kubernetes.io/part-of"),
    ),
    (
        "labels_namespace",
        "other namespace",
        lambda b: b["docs"]["mlflow.yaml"][0]["metadata"].update(namespace="default"),
    ),
    (
        "shared_storage",
        "RWO",
        lambda b: b["docs"]["storage.yaml"][0]["spec"].update(accessModes=["ReadWriteOnce"]),
    ),
    (
        "shared_storage",
        "unmounted",
        lambda b: _gpu_group(b)["template"]["spec"]["containers"][0]["volumeMounts"].pop(0),
    ),
    (
        "shared_storage",
        "local storage_path",
        lambda b: b["docs"]["rayjob-sweep.yaml"][0]["spec"].update(
            entrypoint="pipeline tune train.storage_path=ray_results"
        ),
    ),
    (
        "rayjobs",
        "kept cluster",
        lambda b: b["docs"]["rayjob-train.yaml"][0]["spec"].update(shutdownAfterJobFinishes=False),
    ),
    (
        "rayjobs",
        "spec drift",
        lambda b: b["docs"]["rayjob-sweep.yaml"][0]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(
            maxReplicas=9
        ),
    ),
    (
        "rayjobs",
        "other entrypoint",
        lambda b: b["docs"]["rayjob-train.yaml"][0]["spec"].update(
            entrypoint=ENTRYPOINTS["rayjob-train.yaml"] + " model.hidden=1"
        ),
    ),
    (
        "kustomization",
        "lists the secrets example",
        lambda b: b["docs"]["kustomization.yaml"][0]["resources"].append(SECRETS_EXAMPLE),
    ),
    (
        "kustomization",
        "misses a file",
        lambda b: b["docs"]["kustomization.yaml"][0]["resources"].remove("mlflow.yaml"),
    ),
    (
        "dockerfile",
        "no PIPELINE_CONF_DIR",
        lambda b: b.update(dockerfile=b["dockerfile"].replace("PIPELINE_CONF_DIR", "CONF_DIR")),
    ),
    (
        "dockerfile",
        "conf not copied",
        lambda b: b.update(dockerfile=b["dockerfile"].replace("conf/ conf/", "README.md ./")),
    ),
    (
        "dockerfile",
        ".git in the context",
        lambda b: b.update(dockerignore=b["dockerignore"].replace(".git\n", "")),
    ),
]


@pytest.mark.parametrize("name,what,mutate", MUTATIONS, ids=[f"{n}-{w}" for n, w, _ in MUTATIONS])
def test_check_catches(request, bundle, name, what, mutate):
    broken = copy.deepcopy(bundle)
    mutate(broken)
    if name == "crd":
        problems = check_crd_schema(broken, request.getfixturevalue("crd_schemas"))
    else:
        problems = CHECKS[name](broken)
    assert problems, f"check {name} did not notice: {what}"
