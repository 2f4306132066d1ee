"""Offline checks of k8s/, the Dockerfile and .dockerignore: no cluster, no network.

Every manifest validates strictly (unknown fields are errors, as with `kubectl apply`):
RayCluster/RayJob against the KubeRay CRD schemas (``../shared/k8s-crds`` or ``K8S_CRDS_DIR``),
everything else, and the pod templates inside the Ray resources, with ``kubernetes-validate``.
Then the invariants users rely on: the pods run our image and CLI at the pinned versions, Ray
token auth is on with its token from a Secret, no secret is inline, nothing is exposed outside
the cluster, MLflow accepts its clients' Host headers, resources and worker-group bounds are
consistent, and the shared volume is mounted where the jobs' config puts data and checkpoints.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
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
SHARED = "/mnt/shared"
SECRETS_EXAMPLE = "secrets.example.yaml"
# `kubectl apply -k k8s/` must not create these: Secret templates, and jobs that start work.
NOT_IN_KUSTOMIZATION = {SECRETS_EXAMPLE, "rayjob-train.yaml", "rayjob-sweep.yaml"}
JOBS = {"rayjob-train.yaml": "train", "rayjob-sweep.yaml": "tune"}
K8S_VERSION = kubernetes_validate.latest_version()
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|KEY|BACKEND_STORE_URI", re.IGNORECASE)
URI_WITH_CREDENTIALS = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@", re.IGNORECASE)
# Importing mlflow.server (for its Host check) configures SQLAlchemy mappers, which warns.
pytestmark = pytest.mark.filterwarnings("ignore:.*noload.*:DeprecationWarning")

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
DOCS = {p.name: [d for d in yaml.load_all(p.read_text(), Loader=Loader) if d] for p in sorted(K8S.glob("*.yaml"))}
OBJECTS = [d for ds in DOCS.values() for d in ds]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT_IMAGE = f"ghcr.io/OWNER/lstm-pipeline:{PYPROJECT['project']['version']}"
RAY_PIN = next(Requirement(d).specifier for d in PYPROJECT["project"]["dependencies"] if Requirement(d).name == "ray")


def name_of(d: dict) -> str:
    return f"{d['kind']}/{d['metadata']['name']}"


def of_kind(kind: str) -> list[dict]:
    return [d for d in OBJECTS if d["kind"] == kind]


def the(kind: str, name: str) -> dict:
    (d,) = [d for d in of_kind(kind) if d["metadata"]["name"] == name]
    return d


def ray_specs() -> list[tuple[str, dict]]:
    """The RayCluster's spec and every RayJob's rayClusterSpec."""
    out = [(name_of(d), d["spec"]) for d in of_kind("RayCluster")]
    return out + [(name_of(d), d["spec"]["rayClusterSpec"]) for d in of_kind("RayJob")]


def ray_groups(spec: dict) -> list[tuple[str, dict]]:
    """(group name, pod template) of the head and every worker group."""
    workers = [(g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]]
    return [("head", spec["headGroupSpec"]["template"]), *workers]


def ray_pod_templates() -> list[tuple[str, dict]]:
    """Every Ray group's pod template and the RayJobs' submitter pods."""
    out = [(name_of(d) + " submitter", d["spec"]["submitterPodTemplate"]) for d in of_kind("RayJob")]
    return out + [(f"{w} {g}", t) for w, spec in ray_specs() for g, t in ray_groups(spec)]


def pod_templates() -> list[tuple[str, dict]]:
    workloads = [(name_of(d), d["spec"]["template"]) for d in OBJECTS if d["kind"] in ("Deployment", "StatefulSet")]
    return workloads + ray_pod_templates()


def containers(templates: list[tuple[str, dict]] | None = None) -> list[tuple[str, dict]]:
    """The containers (init ones included) of the templates, by default of every pod template."""
    return [
        (f"{where} {c['name']}", c)
        for where, t in templates or pod_templates()
        for c in t["spec"].get("initContainers", []) + t["spec"]["containers"]
    ]


def quantity(q: object) -> float:
    units = {"": 1, "m": 1e-3} | {u: 1000**i for i, u in enumerate("kMGT", 1)}
    units |= {u + "i": 1024**i for i, u in enumerate("KMGT", 1)}
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(q))
    assert m and m[2] in units, f"not a quantity: {q!r}"
    return float(m[1]) * units[m[2]]


def flag(argv: list[str], name: str) -> str | None:
    return next((a.split("=", 1)[1] for a in argv if a.startswith(name + "=")), None)


# ---------------------------------------------------------------------------- schemas


def strict(schema: object) -> object:
    """CRD schema -> JSON Schema that rejects unknown fields, as the API server's strict field
    validation does: controller-gen omits additionalProperties, and fields outside
    ``properties`` are errors unless x-kubernetes-preserve-unknown-fields is set. The other
    x-kubernetes-* keywords mean nothing to jsonschema (int-or-string fields carry an anyOf)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


@pytest.fixture(scope="module")
def crd_validators() -> dict:
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRDS} (set K8S_CRDS_DIR)")
    out = {}
    for kind, file in [("RayCluster", "ray.io_rayclusters.yaml"), ("RayJob", "ray.io_rayjobs.yaml")]:
        crd = yaml.load((CRDS / file).read_text(), Loader=Loader)  # noqa: S506 (Loader is a SafeLoader)
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        out[kind] = jsonschema.Draft202012Validator(strict(v1["schema"]["openAPIV3Schema"]))
    return out


def crd_errors(validators: dict, d: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validators[d["kind"]].iter_errors(d)]


def k8s_errors(obj: dict) -> list[str]:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as e:
        return [f"{'.'.join(map(str, getattr(e, 'path', [])))}: {e.message} (Kubernetes {K8S_VERSION})"]
    return []


def pod_template_errors(template: dict) -> list[str]:
    return k8s_errors({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template})


def test_manifests_are_kubernetes_objects_of_the_expected_kinds():
    assert all(isinstance(d, dict) and d.get("apiVersion") and d.get("kind") for d in OBJECTS)
    kinds = {d["kind"] for d in OBJECTS}
    assert kinds >= {"Namespace", "PersistentVolumeClaim", "Deployment", "StatefulSet", "Service", "Secret"}
    assert [name_of(d) for d in of_kind("RayCluster")] == ["RayCluster/lstm-pipeline"]
    assert {n: [d["kind"] for d in DOCS[n]] for n in JOBS} == {n: ["RayJob"] for n in JOBS}


@pytest.mark.parametrize("obj", of_kind("RayCluster") + of_kind("RayJob"), ids=name_of)
def test_ray_resources_match_kuberay_crd(crd_validators, obj):
    assert obj["apiVersion"] == "ray.io/v1"
    assert crd_errors(crd_validators, obj) == []


BUILTIN = [d for d in OBJECTS if not d["apiVersion"].startswith(("ray.io/", "kustomize.config.k8s.io/"))]


@pytest.mark.parametrize("obj", BUILTIN, ids=name_of)
def test_builtin_objects_match_kubernetes_schema(obj):
    assert k8s_errors(obj) == []


def test_pod_templates_inside_ray_resources_match_kubernetes_schema():
    # The CRDs leave the pod templates they embed unvalidated below the top; check them as core/v1.
    templates = ray_pod_templates()
    assert len(templates) == 3 * 3 + 2  # head, cpu, gpu of three specs; two submitters
    assert {w: pod_template_errors(t) for w, t in templates} == {w: [] for w, _ in templates}


def group(spec: dict, name: str) -> dict:
    return next(g for g in spec["workerGroupSpecs"] if g["groupName"] == name)


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda s: group(s, "gpu").update(minReplica=0), id="crd-unknown-field"),
        pytest.param(lambda s: group(s, "gpu").update(maxReplicas="4"), id="crd-wrong-type"),
        pytest.param(lambda s: s["authOptions"].update(mode="on"), id="crd-bad-enum"),
        pytest.param(
            lambda s: group(s, "gpu")["template"]["spec"]["containers"][0].update(resource={}), id="pod-field"
        ),
    ],
)
def test_schema_validation_is_strict(crd_validators, mutate):
    broken = copy.deepcopy(the("RayCluster", "lstm-pipeline"))
    mutate(broken["spec"])
    assert crd_errors(crd_validators, broken) + pod_template_errors(group(broken["spec"], "gpu")["template"])


# ---------------------------------------------------------------------------- our image and CLI


def test_dockerfile_builds_our_package_on_the_pinned_ray():
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    froms = [ln.split()[-1] for ln in lines if ln.upper().startswith("FROM ")]
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)(-\S+)?", froms[0])
    assert m and m[1] in RAY_PIN, f"FROM {froms[0]}: want rayproject/ray at pyproject's ray{RAY_PIN}"
    assert any(re.match(r"ENV .*\bPIPELINE_CONF_DIR=/app/conf\b", ln) for ln in lines)
    assert "WORKDIR /app" in lines
    copied = " ".join(ln for ln in lines if ln.startswith("COPY "))
    for src in ("pyproject.toml", "pipeline/", "conf/"):
        assert f" {src} " in f" {copied} ", f"Dockerfile does not copy {src}"
    assert any(re.search(r"pip install --no-cache-dir /app(\s|$)", ln) for ln in lines)
    ignored = {ln.strip().strip("/") for ln in (ROOT / ".dockerignore").read_text().splitlines()}
    assert ignored >= {".git", ".venv", "artifacts", "ray_results", "mlruns", "mlflow.db", "data", ".env"}


def test_ray_pods_run_the_project_image_at_the_pinned_ray():
    for where, spec in ray_specs():
        assert str(spec["rayVersion"]) in RAY_PIN, where
    ray_containers = containers(ray_pod_templates())
    assert len(ray_containers) == 11
    assert {w: c["image"] for w, c in ray_containers} == {w: PROJECT_IMAGE for w, _ in ray_containers}


@pytest.mark.parametrize("file", JOBS)
def test_rayjob_entrypoint_is_our_cli_with_shared_paths_and_gpus(file):
    from pipeline import cli, config

    (job,) = DOCS[file]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["pipeline", JOBS[file]]
    assert cli._parser().parse_args(argv[1:]).command == JOBS[file]
    cfg = config.load_config(argv[2:])  # every override names a real key and option
    for key, value in [("data.root", cfg.data.root), ("data.output_dir", cfg.data.output_dir)]:
        assert value.startswith(SHARED + "/"), f"{key}={value}: not on the shared volume"
    assert cfg.train.storage_path.startswith(SHARED + "/")
    assert cfg.train.use_gpu
    assert JOBS[file] != "tune" or cfg.tune.space, "a sweep over nothing"
    gpu = group(job["spec"]["rayClusterSpec"], "gpu")
    per_pod = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert cfg.train.num_workers * cfg.train.gpus_per_worker <= gpu["maxReplicas"] * per_pod


@pytest.mark.parametrize("file", JOBS)
def test_rayjob_brings_up_the_raycluster_spec_and_tears_it_down(file):
    (job,) = DOCS[file]
    spec = job["spec"]
    assert "clusterSelector" not in spec  # only a cluster the RayJob creates is shut down
    assert spec["rayClusterSpec"] == the("RayCluster", "lstm-pipeline")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0


# ---------------------------------------------------------------------------- security


def test_ray_token_auth_is_on_with_the_token_from_a_secret():
    for where, spec in ray_specs():
        assert spec["authOptions"] == {"mode": "token", "secretName": "ray-auth-token"}, where
    assert "auth_token" in the("Secret", "ray-auth-token")["stringData"]  # the key KubeRay reads
    for where, c in containers():  # the operator sets RAY_AUTH_MODE=token; nothing may turn it off
        assert all(e.get("value") == "token" for e in c.get("env", []) if e["name"] == "RAY_AUTH_MODE"), where


def test_no_secret_inline():
    for where, c in containers():
        for e in c.get("env", []):
            if SECRET_NAME.search(e["name"]):
                assert "secretKeyRef" in e.get("valueFrom", {}), f"{where}: env {e['name']} must be a secretKeyRef"
    for name, docs in DOCS.items():
        if name != SECRETS_EXAMPLE:
            assert "Secret" not in [d["kind"] for d in docs], f"{name}: real Secrets belong in the cluster"
            text = (K8S / name).read_text()
            assert not URI_WITH_CREDENTIALS.search(text), f"{name}: a URI with credentials"
    for d in DOCS[SECRETS_EXAMPLE]:
        assert d["kind"] == "Secret" and "data" not in d
        assert all("REPLACE_ME" in v for v in d["stringData"].values()), f"{name_of(d)}: placeholders only"


def test_nothing_is_exposed_outside_the_cluster():
    exposing = {"Ingress", "Route", "Gateway", "HTTPRoute", "IngressRoute", "VirtualService"}
    assert not [name_of(d) for d in OBJECTS if d["kind"] in exposing]
    for d in of_kind("Service"):
        assert d["spec"].get("type", "ClusterIP") == "ClusterIP", name_of(d)
    for where, spec in ray_specs():
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", where
        assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP", where
        assert not head.get("enableIngress"), where
    for where, t in pod_templates():
        assert not t["spec"].get("hostNetwork"), where
    for where, c in containers():
        assert not [p for p in c.get("ports", []) if "hostPort" in p], where


def test_ray_head_ports_and_dashboard_bind():
    # The submitter pod and port-forwards reach the dashboard through the head Service: bind all.
    for where, spec in ray_specs():
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0", where
        ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
        assert ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001}, where


# ---------------------------------------------------------------------------- MLflow


def mlflow_server() -> dict:
    (c,) = the("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    assert c["command"][:2] == ["mlflow", "server"]
    return c


def test_mlflow_server_binds_its_service_port_and_keeps_credentials_in_secrets():
    c = mlflow_server()
    argv = c["command"]
    assert flag(argv, "--host") == "0.0.0.0" and flag(argv, "--port") == "5000"
    assert {"name": "http", "containerPort": 5000} in c["ports"]
    assert the("Service", "mlflow")["spec"]["ports"] == [{"name": "http", "port": 5000, "targetPort": "http"}]
    # Clients upload artifacts through the server, so only this pod holds S3 credentials.
    assert "--serve-artifacts" in argv and flag(argv, "--artifacts-destination")
    assert flag(argv, "--backend-store-uri") is None  # from the env, so the password is not in argv
    env = {e["name"]: e for e in c["env"]}
    for key in ("MLFLOW_BACKEND_STORE_URI", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"):
        assert "secretKeyRef" in env[key].get("valueFrom", {}), f"{key} must come from a Secret"


def test_ray_pods_log_to_the_mlflow_service():
    for where, spec in ray_specs():
        for g, t in ray_groups(spec):
            env = {e["name"]: e.get("value") for e in t["spec"]["containers"][0].get("env", [])}
            assert env.get("MLFLOW_TRACKING_URI") == f"http://mlflow.{NS}.svc:5000", f"{where} {g}"


def test_mlflow_allowed_hosts_accept_what_clients_send():
    from mlflow.server.security_utils import is_allowed_host_header

    hosts = flag(mlflow_server()["command"], "--allowed-hosts").split(",")
    assert "*" not in hosts  # that would turn the DNS-rebinding check off
    # In-cluster clients by Service name (the Host header has the port), people via port-forward.
    wanted = [f"{h}:5000" for h in ("mlflow", f"mlflow.{NS}.svc", f"mlflow.{NS}.svc.cluster.local")]
    wanted += ["127.0.0.1:5000", "localhost:5000"]
    wanted += [
        urlsplit(e["value"]).netloc for _, c in containers() for e in c.get("env", []) if "TRACKING_URI" in e["name"]
    ]
    assert [h for h in wanted if not is_allowed_host_header(hosts, h)] == []
    assert not is_allowed_host_header(hosts, "evil.example.com:5000")


# ---------------------------------------------------------------------------- resources and scaling


def test_every_container_requests_and_limits_cpu_and_memory():
    autoscalers = [(f"{w} autoscaler", spec["autoscalerOptions"]) for w, spec in ray_specs()]  # the operator adds them
    for where, c in containers() + autoscalers:
        req, lim = c.get("resources", {}).get("requests", {}), c.get("resources", {}).get("limits", {})
        assert {"cpu", "memory"} <= req.keys() & lim.keys(), f"{where}: want cpu and memory requests and limits"
        for r in ("cpu", "memory"):
            assert quantity(req[r]) <= quantity(lim[r]), f"{where}: {r} request above limit"


def test_gpu_group_asks_for_whole_gpus_and_tolerates_the_gpu_taint():
    for where, spec in ray_specs():
        pod = group(spec, "gpu")["template"]["spec"]
        res = pod["containers"][0]["resources"]
        n = res["limits"]["nvidia.com/gpu"]
        assert isinstance(n, int) and n >= 1 and res["requests"].get("nvidia.com/gpu", n) == n, where
        taint = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        assert taint in pod["tolerations"], where
        cpu_limits = group(spec, "cpu")["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert "nvidia.com/gpu" not in cpu_limits, where


def test_autoscaled_worker_groups_have_consistent_bounds():
    for where, spec in ray_specs():
        assert spec["enableInTreeAutoscaling"] is True, where
        assert [g["groupName"] for g in spec["workerGroupSpecs"]] == ["cpu", "gpu"], where
        for g in spec["workerGroupSpecs"]:
            lo, hi = g["minReplicas"], g["maxReplicas"]
            assert 0 <= lo <= g.get("replicas", lo) <= hi and hi > lo, f"{where} {g['groupName']}: {lo=} {hi=}"


# ---------------------------------------------------------------------------- storage, namespace, kustomize


def test_shared_rwx_volume_is_mounted_on_every_ray_pod():
    (pvc,) = DOCS["storage.yaml"]
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for where, spec in ray_specs():
        for g, t in ray_groups(spec):
            claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in t["spec"]["volumes"]}
            for c in t["spec"]["containers"]:
                mounts = [m["name"] for m in c["volumeMounts"] if m["mountPath"] == SHARED]
                assert [claims[m] for m in mounts] == [pvc["metadata"]["name"]], f"{where} {g} {c['name']}"


def test_everything_is_in_the_project_namespace_with_its_labels():
    (ns,) = of_kind("Namespace")
    assert ns["metadata"]["name"] == NS
    assert DOCS["kustomization.yaml"][0]["namespace"] == NS
    for d in OBJECTS:
        if d["kind"] in ("Namespace", "Kustomization"):
            continue
        assert d["metadata"].get("namespace") == NS, name_of(d)  # RayJobs are `kubectl create`d, not kustomized
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == NS, name_of(d)
    for where, t in pod_templates():
        assert t["metadata"]["labels"]["app.kubernetes.io/part-of"] == NS, where


def test_services_select_their_pods():
    for name in ("mlflow", "postgres"):
        selector = the("Service", name)["spec"]["selector"]
        workload = next(d for d in of_kind("Deployment") + of_kind("StatefulSet") if d["metadata"]["name"] == name)
        assert workload["spec"]["selector"]["matchLabels"] == selector
        assert selector.items() <= workload["spec"]["template"]["metadata"]["labels"].items()


def test_kustomization_lists_the_long_lived_resources_only():
    (kust,) = DOCS["kustomization.yaml"]
    assert set(kust["resources"]) == set(DOCS) - NOT_IN_KUSTOMIZATION - {"kustomization.yaml"}


def test_kubectl_kustomize_renders():
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not installed")
    out = subprocess.run([kubectl, "kustomize", str(K8S)], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    kinds = {d["kind"] for d in yaml.load_all(out.stdout, Loader=Loader) if d}
    assert kinds >= {"Namespace", "PersistentVolumeClaim", "Deployment", "StatefulSet", "Service", "RayCluster"}
    assert "Secret" not in kinds and "RayJob" not in kinds


# ---------------------------------------------------------------------------- production hardening


@pytest.mark.parametrize("file", JOBS)
def test_rayjob_has_a_deadline_beyond_its_training_budget(file):
    from pipeline import config

    (job,) = DOCS[file]
    deadline = job["spec"].get("activeDeadlineSeconds")
    assert isinstance(deadline, int) and deadline > 0, f"{file}: no activeDeadlineSeconds"
    cfg = config.load_config(shlex.split(job["spec"]["entrypoint"])[2:])
    # A deadline shorter than the budget kills every run before it is tested and logged.
    assert cfg.train.max_minutes > 0 and deadline >= cfg.train.max_minutes * 60 + 3600, file


@pytest.mark.parametrize("file", JOBS)
def test_rayjob_names_its_run_so_that_creating_it_again_resumes(file):
    from pipeline import config

    (job,) = DOCS[file]
    cfg = config.load_config(shlex.split(job["spec"]["entrypoint"])[2:])
    name = cfg.tune.name if JOBS[file] == "tune" else cfg.train.run_name
    assert name, f"{file}: an empty name is a fresh timestamped run each time"


def test_ray_clusters_use_the_v2_autoscaler():
    for where, spec in ray_specs():
        assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2", where
        for g, t in ray_groups(spec):
            # KubeRay refuses the env var next to `version`, and any restartPolicy but Never.
            env = [e["name"] for c in t["spec"]["containers"] for e in c.get("env", [])]
            assert "RAY_enable_autoscaler_v2" not in env, f"{where} {g}"
            assert t["spec"].get("restartPolicy", "Never") == "Never", f"{where} {g}"


def _selects(selector: dict, labels: dict) -> bool:
    assert not selector.get("matchExpressions"), "the evaluator below reads matchLabels only"
    return selector.get("matchLabels", {}).items() <= labels.items()


def _ingress_allowed(src: dict, src_ns: dict, dst: dict, port: int) -> bool:
    """NetworkPolicy semantics for one connection: with no policy selecting the destination pod
    everything is allowed; otherwise only what some rule of a selecting policy allows (a peer
    with a podSelector alone means this namespace; ports absent = all)."""
    policies = [p for p in of_kind("NetworkPolicy") if _selects(p["spec"]["podSelector"], dst)]
    policies = [p for p in policies if "Ingress" in p["spec"]["policyTypes"]]
    if not policies:
        return True
    for p in policies:
        for rule in p["spec"].get("ingress", []):
            ports = [r["port"] for r in rule.get("ports", [])]
            if ports and port not in ports:
                continue
            for peer in rule.get("from", []):
                ns_ok = (
                    _selects(peer["namespaceSelector"], src_ns)
                    if "namespaceSelector" in peer
                    else src_ns.get("kubernetes.io/metadata.name") == NS
                )
                if ns_ok and _selects(peer.get("podSelector", {}), src):
                    return True
    return False


def _labels_of(where_prefix: str) -> dict:
    return next(t["metadata"]["labels"] for w, t in pod_templates() if w.startswith(where_prefix))


def test_network_policies_let_only_the_namespace_ray_pods_reach_mlflow_and_ray():
    ours = {"kubernetes.io/metadata.name": NS}
    other_ns = {"kubernetes.io/metadata.name": "default"}
    operator = {"kubernetes.io/metadata.name": "kuberay-system"}
    mlflow, postgres = _labels_of("Deployment/mlflow"), _labels_of("StatefulSet/postgres")
    submitter = _labels_of("RayJob/lstm-train submitter")
    stranger = {"app": "anything"}
    ray_pods = [t["metadata"]["labels"] for w, t in ray_pod_templates() if "submitter" not in w]
    assert len(ray_pods) == 9
    for ray in ray_pods:
        assert _ingress_allowed(ray, ours, mlflow, 5000)
        assert not _ingress_allowed(ray, other_ns, mlflow, 5000)  # a Ray pod of someone else
        assert not _ingress_allowed(ray, ours, postgres, 5432)
        for other in ray_pods:
            assert _ingress_allowed(ray, ours, other, 6379) and _ingress_allowed(ray, ours, other, 23456)
        assert _ingress_allowed(submitter, ours, ray, 8265) and not _ingress_allowed(submitter, ours, ray, 6379)
        assert _ingress_allowed({}, operator, ray, 8265) and not _ingress_allowed({}, operator, ray, 6379)
        assert not _ingress_allowed(stranger, ours, ray, 8265) and not _ingress_allowed(ray, other_ns, ray, 6379)
    for who, ns in [(stranger, ours), (submitter, ours), (mlflow, ours), ({}, operator), (stranger, other_ns)]:
        assert not _ingress_allowed(who, ns, mlflow, 5000), who
    assert _ingress_allowed(mlflow, ours, postgres, 5432) and not _ingress_allowed(stranger, ours, postgres, 5432)
    assert not _ingress_allowed(stranger, ours, {"app": "new-pod"}, 80)  # default deny


def test_every_pod_runs_unprivileged_with_the_runtime_default_seccomp():
    for where, t in pod_templates():
        pod = t["spec"].get("securityContext", {})
        assert pod.get("runAsNonRoot") is True and isinstance(pod.get("runAsUser"), int), where
        assert pod.get("seccompProfile") == {"type": "RuntimeDefault"}, where
        assert not t["spec"].get("hostPID") and not t["spec"].get("hostIPC"), where
    autoscalers = [(f"{w} autoscaler", spec["autoscalerOptions"]) for w, spec in ray_specs()]
    for where, c in containers() + autoscalers:
        sc = c.get("securityContext", {})
        assert sc.get("allowPrivilegeEscalation") is False and "ALL" in sc.get("capabilities", {}).get("drop", []), (
            where
        )
        assert not sc.get("privileged") and not sc.get("capabilities", {}).get("add"), where
        assert sc.get("runAsUser", 1) != 0, where


def test_mlflow_requires_authentication_with_credentials_from_secrets():
    import configparser

    c = mlflow_server()
    assert flag(c["command"], "--app-name") == "basic-auth"
    env = {e["name"]: e for e in c["env"]}
    for key in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert env[key]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-auth", key
    # The settings file comes from the same Secret, mounted where MLFLOW_AUTH_CONFIG_PATH says.
    (mount,) = [
        m for m in c["volumeMounts"] if env["MLFLOW_AUTH_CONFIG_PATH"]["value"].startswith(m["mountPath"] + "/")
    ]
    (volume,) = [
        v for v in the("Deployment", "mlflow")["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]
    ]
    assert volume["secret"]["secretName"] == "mlflow-auth"
    ini = configparser.ConfigParser()
    ini.read_string(the("Secret", "mlflow-auth")["stringData"]["basic_auth.ini"])
    # A user nobody granted more may read, never move `champion` (SetRegisteredModelAlias needs EDIT).
    assert ini["mlflow"]["default_permission"] in ("READ", "NO_PERMISSIONS")
    assert ini["mlflow"]["database_uri"].startswith("postgresql"), "a SQLite file in the pod dies with it"
    assert not ini["mlflow"].get("admin_password"), "the admin password belongs in its own Secret key"
    # Every Ray container logs as the pipeline user, from a Secret.
    for where, spec in ray_specs():
        for g, t in ray_groups(spec):
            renv = {e["name"]: e for e in t["spec"]["containers"][0]["env"]}
            for key, secret_key in (("MLFLOW_TRACKING_USERNAME", "username"), ("MLFLOW_TRACKING_PASSWORD", "password")):
                assert renv[key]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-client", "key": secret_key}, (
                    f"{where} {g}"
                )
            assert renv["PIPELINE_DURABLE_ROOT"]["value"] == SHARED, f"{where} {g}"


PINNED = re.compile(r"[^:@\s]+(@sha256:[0-9a-f]{64}|:v?\d+\.\d+(\.\d+)?([-.][\w.]+)?)")


def test_images_are_pinned():
    images = [(w, c["image"]) for w, c in containers()]
    images += [
        (w, spec["autoscalerOptions"]["image"]) for w, spec in ray_specs() if "image" in spec["autoscalerOptions"]
    ]
    for dockerfile in (ROOT / "Dockerfile", K8S / "mlflow.Dockerfile"):
        images += [
            (dockerfile.name, ln.split()[-1]) for ln in dockerfile.read_text().splitlines() if ln.startswith("FROM ")
        ]
    assert len(images) >= 14
    assert [(w, i) for w, i in images if not PINNED.fullmatch(i) or i.endswith(":latest")] == []
    # The MLflow server's image is ours, built from mlflow.Dockerfile: its tag is the base's MLflow.
    (base,) = [i for w, i in images if w == "mlflow.Dockerfile"]
    assert mlflow_server()["image"].rsplit(":", 1)[1] == base.rsplit(":v", 1)[1]


def test_nothing_is_installed_at_pod_start():
    for where, c in containers():
        argv = " ".join(map(str, c.get("command", []) + c.get("args", [])))
        assert not re.search(r"\b(pip3?|uv|conda|apt(-get)?)\s+(pip\s+)?install\b", argv), where
    for d in of_kind("RayJob"):
        assert "runtimeEnvYAML" not in d["spec"], f"{name_of(d)}: a runtime_env installs at job start"
    # What the MLflow pod needs is baked into its image, pinned.
    text = (K8S / "mlflow.Dockerfile").read_text()
    for pkg in ("psycopg2-binary", "boto3", "Flask-WTF"):
        assert re.search(rf"\b{pkg}==\d", text), f"mlflow.Dockerfile: {pkg} not installed at a pinned version"
    users = [ln.split()[1] for ln in text.splitlines() if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
