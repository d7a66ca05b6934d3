"""The deployment files under infra/: Kubernetes manifests validated offline against the API
schemas, the properties a reviewer checks by hand, and the Dockerfile's install order and command.

Schema validation uses kubernetes-validate's bundled schemas (no network, no cluster).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
K8S = INFRA / "kubernetes"
DOCKERFILE = INFRA / "Dockerfile"
NAMESPACE = "voxelflow"

# A Kubernetes release whose schemas kubernetes-validate ships (its 1.37 release bundles 1.25-1.37);
# an old, widely deployed minor so the manifests do not lean on anything newer.
K8S_VERSION = "1.33.0"

INFERENCE = "demo-spheres-inference"  # the Deployment and Service of inference.yaml (rendered for the demo spec)
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod"}


# --------------------------------------------------------------------------- loading


def manifest_files() -> list[Path]:
    """Every YAML file under infra/kubernetes except kustomization.yaml (not a Kubernetes object)."""
    return sorted(p for p in K8S.glob("*.y*ml") if p.name not in ("kustomization.yaml", "kustomization.yml"))


def load_documents() -> list[tuple[Path, dict]]:
    docs = []
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:  # a trailing `---` gives None
                docs.append((path, doc))
    return docs


DOCS = load_documents()


def doc_id(entry: tuple[Path, dict]) -> str:
    path, doc = entry
    return f"{path.name}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def find(kind: str, name: str) -> dict:
    matches = [d for _, d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected exactly one {kind}/{name} in infra/kubernetes, found {len(matches)}"
    return matches[0]


def pod_spec(doc: dict) -> dict:
    if doc["kind"] == "Pod":
        return doc["spec"]
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


def workloads() -> list[tuple[str, dict]]:
    return [(doc_id((p, d)), d) for p, d in DOCS if d["kind"] in WORKLOAD_KINDS]


def all_containers(spec: dict) -> list[dict]:
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def containers() -> list[tuple[str, dict, dict]]:
    """(id, pod spec, container) for every container of every workload."""
    return [
        (f"{wid}/{c['name']}", pod_spec(d), c) for wid, d in workloads() for c in all_containers(pod_spec(d))
    ]


def container(deployment: str, name: str | None = None) -> dict:
    cs = pod_spec(find("Deployment", deployment))["containers"]
    return cs[0] if name is None else next(c for c in cs if c["name"] == name)


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def port_number(c: dict, port: int | str) -> int:
    """A probe's or Service's port (number or containerPort name) as a number."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in c.get("ports", []) if "name" in p}
    assert port in named, f"container {c['name']!r} has no port named {port!r} (has {sorted(named)})"
    return named[port]


# --------------------------------------------------------------------------- schema validation


def test_there_are_manifests():
    names = {p.name for p in manifest_files()}
    assert {"inference.yaml", "prefect-worker.yaml", "mlflow.yaml"} <= names
    assert DOCS


def test_the_kubernetes_version_is_bundled():
    """Fail loudly (not skip) if an upgrade of kubernetes-validate drops the schemas we pin."""
    from kubernetes_validate.utils import all_versions

    assert K8S_VERSION in all_versions(), (
        f"kubernetes-validate {kubernetes_validate.__version__} ships schemas for {all_versions()}, "
        f"not {K8S_VERSION}: raise K8S_VERSION or pin the package"
    )


@pytest.mark.parametrize("entry", DOCS, ids=doc_id)
def test_manifest_is_valid_against_the_kubernetes_schema(entry):
    _, doc = entry
    try:
        validated = kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path) or "(top level)"
        pytest.fail(f"{doc_id(entry)} is not a valid {doc['kind']} for Kubernetes {K8S_VERSION}: "
                    f"{where}: {exc.message}")
    except kubernetes_validate.SchemaNotFoundError as exc:
        pytest.fail(f"{doc_id(entry)}: {exc.message}")
    # validate() falls back to the newest schema set not newer than the one asked for; make sure
    # it did not fall back.
    assert validated == ".".join(K8S_VERSION.split(".")[:2])


@pytest.mark.parametrize("entry", DOCS, ids=doc_id)
def test_every_object_lives_in_the_voxelflow_namespace(entry):
    _, doc = entry
    if doc["kind"] == "Namespace":
        assert doc["metadata"]["name"] == NAMESPACE
    else:
        assert doc["metadata"].get("namespace") == NAMESPACE


def test_kustomization_lists_every_manifest_with_the_namespace():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == NAMESPACE
    assert sorted(kustomization["resources"]) == sorted(p.name for p in manifest_files())


def test_object_names_are_unique_per_kind():
    seen = [(d["kind"], d["metadata"]["name"]) for _, d in DOCS]
    assert len(seen) == len(set(seen)), sorted(x for x in seen if seen.count(x) > 1)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_renders_offline():
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert len(rendered) == len(DOCS)
    assert all(d["metadata"].get("namespace", NAMESPACE) == NAMESPACE for d in rendered)


# --------------------------------------------------------------------------- what a reviewer checks


def test_inference_probes_point_at_the_health_endpoints():
    c = container(INFERENCE)
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        if probe in c:
            assert port_number(c, c[probe]["httpGet"]["port"]) == 8000, probe


def test_inference_runs_voxelflow_serve_on_all_interfaces_port_8000():
    c = container(INFERENCE)
    argv = [*c.get("command", []), *c.get("args", [])]
    assert argv[:2] == ["voxelflow", "serve"]
    assert "--host=0.0.0.0" in argv or ["--host", "0.0.0.0"] in [argv[i : i + 2] for i in range(len(argv))]
    assert "--port=8000" in argv or ["--port", "8000"] in [argv[i : i + 2] for i in range(len(argv))]
    assert port_number(c, "http") == 8000


def resolved_env(c: dict) -> dict[str, str]:
    """The container's environment as the kubelet builds it from the shipped objects: ``envFrom`` sources in
    order (a later one wins), then ``env`` over them (literal values and ``secretKeyRef``/``configMapKeyRef``),
    with ``$(VAR)`` of earlier variables expanded in values."""
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        for field, kind in (("secretRef", "Secret"), ("configMapRef", "ConfigMap")):
            if field in source:
                doc = find(kind, source[field]["name"])
                env.update({source.get("prefix", "") + k: str(v)
                            for k, v in {**doc.get("data", {}), **doc.get("stringData", {})}.items()})
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = re.sub(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                                    lambda m: env.get(m[1], m[0]), e["value"])
        else:
            source = e["valueFrom"]
            for field, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
                if field in source:
                    doc = find(kind, source[field]["name"])
                    env[e["name"]] = {**doc.get("data", {}), **doc.get("stringData", {})}[source[field]["key"]]
    return env


def test_inference_pods_take_store_database_and_mlflow_from_the_runtime_secret(monkeypatch):
    """Every pod opens the same database (API keys, audit log) and store: the values of the Secret, which
    nothing in ``env`` overrides; voxelflow's settings read them from that environment."""
    from voxelflow.spec.config import Settings

    c = container(INFERENCE)
    secret = find("Secret", "voxelflow-runtime")["stringData"]
    assert c["envFrom"] == [{"secretRef": {"name": "voxelflow-runtime"}}]
    env = resolved_env(c)
    for name in ("VOXELFLOW_STORE", "VOXELFLOW_DATABASE_URL", "VOXELFLOW_MLFLOW_TRACKING_URI"):
        assert env[name] == secret[name], name
    for name in list(os.environ):
        if name.startswith("VOXELFLOW_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.database == secret["VOXELFLOW_DATABASE_URL"]
    assert settings.store_url == secret["VOXELFLOW_STORE"]
    assert settings.tracking_uri == secret["VOXELFLOW_MLFLOW_TRACKING_URI"]
    assert not settings.database.startswith("sqlite"), "a per-pod SQLite key store answers 401 to every key"


def test_inference_mounts_only_scratch_space():
    """Nothing is mounted that nothing reads (API keys live in the database, not in a file)."""
    pod = pod_spec(find("Deployment", INFERENCE))
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert all(set(v) == {"name", "emptyDir"} for v in volumes.values()), volumes
    (c,) = pod["containers"]
    assert {m["name"] for m in c["volumeMounts"]} == set(volumes)
    assert not [d for _, d in DOCS if d["kind"] == "Secret" and d["metadata"]["name"] == "voxelflow-api-keys"]


def test_service_exposes_port_80_to_the_inference_pods():
    svc = find("Service", INFERENCE)
    dep = find("Deployment", INFERENCE)
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (port,) = svc["spec"]["ports"]
    assert port["port"] == 80
    assert port_number(container(INFERENCE), port["targetPort"]) == 8000


def test_hpa_targets_the_inference_deployment():
    hpa = next(d for _, d in DOCS if d["kind"] == "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    dep = find("Deployment", ref["name"])
    assert ref["kind"] == "Deployment" and ref["apiVersion"] == dep["apiVersion"]
    assert dep is find("Deployment", INFERENCE)
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}
    # A fixed replica count would fight the autoscaler on every apply; CPU utilisation needs a request.
    assert "replicas" not in dep["spec"]
    assert all("cpu" in c["resources"]["requests"] for c in pod_spec(dep)["containers"])


def parse_quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity (100m, 2, 512Mi, 1G) as a number."""
    suffixes = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    assert match and match.group(2) in ("", *suffixes), f"unexpected quantity {value!r}"
    return float(match.group(1)) * suffixes.get(match.group(2), 1)


@pytest.mark.parametrize("cid,spec,c", containers(), ids=[x[0] for x in containers()])
def test_every_container_has_requests_and_limits(cid, spec, c):
    resources = c.get("resources", {})
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources.get(kind, {})), f"{cid}: {kind} needs cpu and memory"
    for res in ("cpu", "memory"):
        assert parse_quantity(resources["requests"][res]) <= parse_quantity(resources["limits"][res]), (cid, res)


@pytest.mark.parametrize("cid,spec,c", containers(), ids=[x[0] for x in containers()])
def test_no_container_runs_privileged_or_as_root(cid, spec, c):
    sc = c.get("securityContext", {})
    assert sc.get("privileged", False) is False
    assert sc.get("allowPrivilegeEscalation") is False
    assert "ALL" in sc.get("capabilities", {}).get("drop", [])
    assert not sc.get("capabilities", {}).get("add")
    run_as_non_root = sc.get("runAsNonRoot", spec.get("securityContext", {}).get("runAsNonRoot"))
    assert run_as_non_root is True
    uid = sc.get("runAsUser", spec.get("securityContext", {}).get("runAsUser"))
    assert uid != 0
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")


@pytest.mark.parametrize("cid,spec,c", containers(), ids=[x[0] for x in containers()])
def test_args_only_expand_variables_the_container_defines(cid, spec, c):
    """Kubernetes leaves an undefined $(VAR) in command/args as literal text, silently."""
    defined = set(env_of(c))
    for word in [*c.get("command", []), *c.get("args", [])]:
        for var in re.findall(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)", str(word)):
            assert var in defined, f"{cid}: {word!r} uses $({var}), which is not in the container's env"


def referenced_objects() -> list[tuple[str, str, str | None, bool]]:
    """(kind, name, key or None, optional) for every object a workload refers to."""
    refs = []
    for _, d in workloads():
        spec = pod_spec(d)
        if "serviceAccountName" in spec:
            refs.append(("ServiceAccount", spec["serviceAccountName"], None, False))
        for v in spec.get("volumes", []):
            if "secret" in v:
                refs.append(("Secret", v["secret"]["secretName"], None, v["secret"].get("optional", False)))
                refs += [("Secret", v["secret"]["secretName"], i["key"], v["secret"].get("optional", False))
                         for i in v["secret"].get("items", [])]
            if "configMap" in v:
                refs.append(("ConfigMap", v["configMap"]["name"], None, v["configMap"].get("optional", False)))
            if "persistentVolumeClaim" in v:
                refs.append(("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"], None, False))
        for c in all_containers(spec):
            for e in c.get("env", []):
                source = e.get("valueFrom", {})
                for field, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
                    if field in source:
                        ref = source[field]
                        refs.append((kind, ref["name"], ref["key"], ref.get("optional", False)))
            for e in c.get("envFrom", []):
                for field, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                    if field in e:
                        refs.append((kind, e[field]["name"], None, e[field].get("optional", False)))
    return refs


@pytest.mark.parametrize("kind,name,key,optional", referenced_objects(),
                         ids=[f"{k}/{n}" + (f"[{key}]" if key else "") for k, n, key, _ in referenced_objects()])
def test_referenced_configmaps_secrets_and_claims_exist(kind, name, key, optional):
    defined = [d for _, d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name]
    if optional and not defined:
        return  # e.g. PREFECT_API_KEY: only for Prefect Cloud, created out of band
    assert defined, f"{kind}/{name} is referenced but not defined in infra/kubernetes"
    if key is not None:
        keys = {**defined[0].get("data", {}), **defined[0].get("stringData", {})}
        assert key in keys, f"{kind}/{name} has no key {key!r} (has {sorted(keys)})"


def kubernetes_pools_of_deployments() -> set[str]:
    doc = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    return {d["work_pool"]["name"] for d in doc["deployments"] if d["work_pool"]["name"].startswith("k8s-")}


@pytest.mark.parametrize("worker,pool", [("prefect-worker-cpu", "k8s-cpu"), ("prefect-worker-gpu", "k8s-gpu")])
def test_prefect_workers_poll_the_kubernetes_pools_of_the_deployments(worker, pool):
    assert pool in kubernetes_pools_of_deployments()
    c = container(worker)
    argv = " ".join([*c.get("command", []), *c.get("args", [])])
    assert argv.startswith("prefect worker start")
    assert re.search(rf"--pool[ =]{pool}(\s|$)", argv)
    assert re.search(r"--type[ =]kubernetes\b", argv)
    env = env_of(c)
    assert "configMapKeyRef" in env["PREFECT_API_URL"]["valueFrom"]
    api_key = env["PREFECT_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert api_key.get("optional") is True
    # The observer watches cluster-wide by default, which the namespaced Role does not allow.
    observer = env["PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES"]["valueFrom"]["configMapKeyRef"]
    assert find("ConfigMap", observer["name"])["data"][observer["key"]] == NAMESPACE


def test_every_kubernetes_pool_has_a_worker():
    polled = set()
    for _, doc in DOCS:
        if doc["kind"] != "Deployment":
            continue
        for c in pod_spec(doc)["containers"]:
            argv = [*c.get("command", []), *c.get("args", [])]
            if argv[:3] == ["prefect", "worker", "start"]:
                polled.add(argv[argv.index("--pool") + 1])
    assert polled == kubernetes_pools_of_deployments()


@pytest.mark.parametrize("worker", ["prefect-worker-cpu", "prefect-worker-gpu"])
def test_prefect_worker_rbac_allows_jobs_pods_and_logs_only_in_its_namespace(worker):
    dep = find("Deployment", worker)
    sa = pod_spec(dep)["serviceAccountName"]
    bindings = [d for _, d in DOCS if d["kind"] == "RoleBinding"
                and any(s["kind"] == "ServiceAccount" and s["name"] == sa for s in d["subjects"])]
    assert bindings, f"no RoleBinding for ServiceAccount {sa}"
    assert not [d for _, d in DOCS if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]

    def allowed(group: str, resource: str, verb: str) -> bool:
        for b in bindings:
            role = find(b["roleRef"]["kind"], b["roleRef"]["name"])
            for rule in role["rules"]:
                if group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]:
                    return True
        return False

    for verb in ("create", "get", "list", "watch", "delete"):
        assert allowed("batch", "jobs", verb), f"worker cannot {verb} jobs"
    for resource in ("pods", "pods/log"):
        assert allowed("", resource, "get"), f"worker cannot get {resource}"
    assert allowed("", "pods", "watch")
    for resource in ("secrets", "pods/exec", "roles", "rolebindings"):
        assert not any(allowed(g, resource, v) for g in ("", "rbac.authorization.k8s.io") for v in ("get", "create"))


def test_mlflow_server_command_and_its_inputs():
    c = container("mlflow")
    argv = [*c["command"], *c["args"]]
    assert argv[:2] == ["mlflow", "server"]
    flags = dict(zip(argv[2::2], argv[3::2]))
    assert flags["--backend-store-uri"] == "$(MLFLOW_BACKEND_STORE_URI)"
    assert flags["--artifacts-destination"] == "$(MLFLOW_ARTIFACTS_DESTINATION)"
    assert (flags["--host"], flags["--port"]) == ("0.0.0.0", "5000")
    env = env_of(c)
    assert "secretKeyRef" in env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]
    assert "configMapKeyRef" in env["MLFLOW_ARTIFACTS_DESTINATION"]["valueFrom"]
    svc = find("Service", "mlflow")
    assert port_number(c, svc["spec"]["ports"][0]["targetPort"]) == 5000
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"  # exempt from MLflow's Host-header check


def test_mlflow_accepts_the_host_the_services_use():
    """MLflow rejects (403) Host headers outside --allowed-hosts; its default admits only localhost
    and private IPs, not a Service name. The tracking URI handed to voxelflow must be admitted.
    Matching as in mlflow.server.security_utils.is_allowed_host_header: fnmatch when the pattern
    has a '*', equality otherwise."""
    c = container("mlflow")
    flags = dict(zip(c["args"][::2], c["args"][1::2]))
    assert flags["--allowed-hosts"] == "$(MLFLOW_ALLOWED_HOSTS)"
    ref = env_of(c)["MLFLOW_ALLOWED_HOSTS"]["valueFrom"]["configMapKeyRef"]
    allowed = [h.strip() for h in find("ConfigMap", ref["name"])["data"][ref["key"]].split(",")]
    assert "*" not in allowed
    tracking = find("Secret", "voxelflow-runtime")["stringData"]["VOXELFLOW_MLFLOW_TRACKING_URI"]
    url = urlsplit(tracking)
    host = url.netloc if url.port else f"{url.hostname}"
    assert any(fnmatch.fnmatch(host, a) if "*" in a else host == a for a in allowed), (host, allowed)
    # ... and it names the mlflow Service on its port.
    assert url.hostname.split(".")[0] == "mlflow"
    assert (url.port or 80) == find("Service", "mlflow")["spec"]["ports"][0]["port"]


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with continuation lines joined and comments dropped."""
    instructions, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue  # comment lines inside a continued instruction are ignored by Docker
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        word, _, rest = current.strip().partition(" ")
        instructions.append((word.upper(), rest.strip()))
        current = ""
    assert not current, "Dockerfile ends inside a continued line"
    return instructions


def dockerfile_env() -> dict[str, str]:
    env = {}
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def first_index(instructions, predicate) -> int:
    return next(i for i, ins in enumerate(instructions) if predicate(*ins))


def test_the_image_for_gpu_nodes_installs_the_gpu_extra():
    """--build-arg VOXELFLOW_EXTRAS=gpu installs dask-cuda with its CUDA bindings and nvidia-ml-py (MLflow's
    GPU metrics): without them `preprocess.device: cuda` is refused on the cluster."""
    import tomllib

    ins = dockerfile_instructions()
    assert ("ARG", 'VOXELFLOW_EXTRAS=""') in ins
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for name in ("gpu", "gpu-cu12"):
        assert any(d.startswith("dask-cuda[cu") for d in extras[name]) and any("nvidia-ml-py" in d for d in extras[name])
    install = next(r for w, r in ins if w == "RUN" and "pip install" in r and "prefect-kubernetes" in r)
    assert '".${VOXELFLOW_EXTRAS:+[${VOXELFLOW_EXTRAS}]}"' in install


def test_dockerfile_base_workdir_home_and_port():
    ins = dockerfile_instructions()
    assert ins[0] == ("FROM", "python:3.11-slim")
    assert ("WORKDIR", "/opt/voxelflow") in ins
    assert dockerfile_env()["VOXELFLOW_HOME"] == "/data/voxelflow"
    assert ("EXPOSE", "8000") in ins


def test_dockerfile_installs_pinned_torch_before_the_project():
    ins = dockerfile_instructions()
    is_pip = lambda w, r: w == "RUN" and "pip install" in r  # noqa: E731
    torch_at = first_index(ins, lambda w, r: is_pip(w, r) and re.search(r"\btorch\b", r))
    project_at = first_index(ins, lambda w, r: is_pip(w, r) and re.search(
        r"pip install\s+(\S+\s+)*\"?\.(\$\{VOXELFLOW_EXTRAS:\+\[\$\{VOXELFLOW_EXTRAS\}\]\})?\"?(\s|$)", r))
    copy_project_at = first_index(ins, lambda w, r: w == "COPY" and "pyproject.toml" in r)
    assert torch_at < copy_project_at < project_at, "torch must be installed before the project is copied and installed"
    assert first_index(ins, is_pip) == torch_at, "torch is the first thing pip installs"

    torch_words = [w for w in shlex.split(ins[torch_at][1]) if re.match(r"torch\b", w)]
    assert len(torch_words) == 1 and re.fullmatch(r"torch==\d+\.\d+\.\d+", torch_words[0]), torch_words
    pinned = torch_words[0].split("==")[1]

    # The pin satisfies pyproject's range (so `pip install .` keeps it) and matches the Makefile.
    from packaging.requirements import Requirement
    from packaging.version import Version

    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - Python < 3.11
        pytest.skip("tomllib needs Python 3.11")
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = next(Requirement(d) for d in deps if Requirement(d).name == "torch")
    assert Version(pinned) in torch_req.specifier, f"torch=={pinned} is outside pyproject's {torch_req}"
    makefile_pins = re.findall(r"torch==(\d+\.\d+\.\d+)", (REPO / "Makefile").read_text())
    assert makefile_pins in ([], [pinned]), f"Makefile pins torch {makefile_pins}, the image {pinned}"


def test_dockerfile_runs_as_a_numeric_non_root_user_after_installing():
    ins = dockerfile_instructions()
    users = [i for i, (w, _) in enumerate(ins) if w == "USER"]
    assert users, "the image must not run as root"
    user = ins[users[-1]][1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric UID lets Kubernetes verify runAsNonRoot"
    assert users[-1] > max(i for i, (w, _) in enumerate(ins) if w == "RUN")
    for _, doc in DOCS:
        if doc["kind"] in WORKLOAD_KINDS:
            assert pod_spec(doc)["securityContext"]["runAsUser"] == int(uid), doc["metadata"]["name"]


def test_dockerfile_default_command_serves():
    ins = dockerfile_instructions()
    cmds = [r for w, r in ins if w == "CMD"]
    assert cmds, "no CMD"
    cmd = json.loads(cmds[-1])  # exec form: signals reach the server directly
    assert cmd[:2] == ["voxelflow", "serve"]
    assert cmd[2:] == ["--host", "0.0.0.0", "--port", "8000"]
    assert not [w for w, _ in ins if w == "ENTRYPOINT"]


def copied_sources() -> list[str]:
    sources = []
    for word, rest in dockerfile_instructions():
        if word == "COPY":
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            sources += parts[:-1]
    return sources


def test_dockerfile_copies_exist_and_the_project_builds_from_them(tmp_path):
    """`pip install .` in the image sees only what COPY brought in: build a wheel from exactly that."""
    sources = copied_sources()
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for source in sources:
        src = REPO / source
        if src.is_dir():
            shutil.copytree(src, ctx / source.rstrip("/"), ignore=ignore)
        else:
            shutil.copy2(src, ctx / source)
    pytest.importorskip("setuptools")
    out = subprocess.run(
        [sys.executable, "-c", "import setuptools.build_meta as b, sys; print(b.build_wheel(sys.argv[1]))",
         str(tmp_path / "dist")],
        cwd=ctx, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    wheel = tmp_path / "dist" / out.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    for module in ("voxelflow/serving/serve.py", "flows/cli.py", "flows/lifecycle.py", "tasks/__init__.py"):
        assert module in names, f"{module} missing from the wheel built from the COPY set"
    assert re.search(r"^voxelflow\s*=\s*flows\.cli:app$", entry_points, re.M)
