"""`deploy.target: kubernetes`: manifests rendered from the spec, validated offline against Kubernetes' schemas."""

from __future__ import annotations

import os

import pytest
import yaml

from tests.conftest import REPO, run_cli
from voxelflow.serving import k8s_deploy
from voxelflow.spec.config import SpecError, load_spec

kubernetes_validate = pytest.importorskip("kubernetes_validate")
K8S_VERSION = "1.33.0"  # as in test_manifests.py
DEMO = REPO / "deployments" / "specs" / "demo.yaml"


def rendered(*sets: str) -> dict[str, dict]:
    spec = load_spec(DEMO, sets=["deploy.target=kubernetes", *sets])
    return {d["kind"] + "/" + d["metadata"]["name"]: d for d in k8s_deploy.render(spec)}


VARIANTS = {
    "cpu": [],
    "gpu-queue-depth": ["deploy.kubernetes.gpu=1", "deploy.kubernetes.autoscale.metric=queue_depth",
                        "deploy.kubernetes.autoscale.target=4", "deploy.kubernetes.cpu_request=500m"],
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_manifest_is_valid_for_kubernetes(variant):
    docs = rendered(*VARIANTS[variant])
    assert sorted(k.split("/")[0] for k in docs) == ["Deployment", "HorizontalPodAutoscaler", "NetworkPolicy",
                                                     "NetworkPolicy", "PodDisruptionBudget", "Service"]
    for key, doc in docs.items():
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{key}: {exc.message} at {'.'.join(map(str, exc.path))}")


def test_the_pod_is_locked_down_and_probed():
    dep = rendered()["Deployment/demo-spheres-inference"]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] and c["securityContext"]["readOnlyRootFilesystem"]
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"] and not c["securityContext"][
        "allowPrivilegeEscalation"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/live"
    # a pod busy serving must not be restarted for a slow probe: more than Kubernetes' 1 s default
    assert c["livenessProbe"]["timeoutSeconds"] >= 5 and c["livenessProbe"]["failureThreshold"] >= 3
    assert c["envFrom"] == [{"secretRef": {"name": "voxelflow-runtime"}}]
    overridden = {e["name"] for e in c["env"]} & {"VOXELFLOW_STORE", "VOXELFLOW_DATABASE_URL",
                                                  "VOXELFLOW_MLFLOW_TRACKING_URI"}
    assert not overridden, f"env would override the Secret's {overridden}"
    assert all(set(v) == {"name", "emptyDir"} for v in pod["volumes"])  # no file mounted that nothing reads
    assert "--model=demo-spheres" in c["args"] and "--alias=champion" in c["args"]
    assert "replicas" not in dep["spec"]  # the autoscaler owns the count
    assert "nvidia.com/gpu" not in c["resources"]["limits"] and "tolerations" not in pod


def test_gpu_and_queue_depth_autoscaling():
    docs = rendered(*VARIANTS["gpu-queue-depth"])
    pod = docs["Deployment/demo-spheres-inference"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu" and pod["nodeSelector"]
    hpa = docs["HorizontalPodAutoscaler/demo-spheres-inference"]["spec"]
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == "voxelflow_queue_depth"
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 6)


def test_only_the_gateway_calls_it_and_only_its_pods_reach_mlflow():
    docs = rendered("deploy.kubernetes.allowed_namespaces=[ingress-nginx]")
    policy = docs["NetworkPolicy/demo-spheres-inference"]["spec"]
    (rule,) = policy["ingress"]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]
    mlflow = docs["NetworkPolicy/demo-spheres-mlflow-clients"]["spec"]
    allowed = mlflow["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    pod_labels = docs["Deployment/demo-spheres-inference"]["spec"]["template"]["metadata"]["labels"]
    assert allowed.items() <= pod_labels.items()


@pytest.mark.parametrize("sets, message", [
    (["deploy.kubernetes.gpu=1"], "applies only to deploy.target: kubernetes"),
    (["deploy.target=kubernetes", "deploy.kubernetes.autoscale.max_replicas=1"], "below min_replicas"),
    (["deploy.target=kubernetes", "deploy.kubernetes.replicas=3"], "unknown key"),
])
def test_bad_deploy_sections_are_refused_at_load(sets, message):
    with pytest.raises(SpecError, match=message):
        load_spec(DEMO, sets=sets)


def test_cli_prints_the_same_manifests_and_refuses_a_local_target():
    proc = run_cli(["voxelflow", "deploy", "render", str(DEMO), "--set", "deploy.target=kubernetes"],
                   dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert [d for d in yaml.safe_load_all(proc.stdout) if d] == list(rendered().values())
    local = run_cli(["voxelflow", "deploy", "render", str(DEMO)], dict(os.environ))
    assert local.returncode == 1 and "set it to kubernetes" in " ".join(local.stderr.split())


def test_applying_without_a_cluster_says_so(monkeypatch, tmp_path):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-config"))
    assert k8s_deploy.cluster_configured() is None
    with pytest.raises(RuntimeError, match="no Kubernetes cluster is configured"):
        k8s_deploy.apply(list(rendered().values()))


def test_the_shipped_inference_manifests_are_the_renderers_output():
    """infra/kubernetes/inference.yaml is generated (`python -m voxelflow.serving.k8s_deploy`), never edited by hand."""
    shipped = REPO / "infra" / "kubernetes" / "inference.yaml"
    assert shipped.read_text() == k8s_deploy.shipped(REPO), (
        "infra/kubernetes/inference.yaml is out of date: python -m voxelflow.serving.k8s_deploy > infra/kubernetes/inference.yaml")
    path, sets = k8s_deploy.SHIPPED
    assert [d for d in yaml.safe_load_all(shipped.read_text()) if d] == k8s_deploy.render(load_spec(REPO / path,
                                                                                                     sets=sets))


def test_flow_run_jobs_still_reach_mlflow():
    """The MLflow policy admits the inference pods and the pods of Jobs (the work pools' flow runs)."""
    mlflow = rendered()["NetworkPolicy/demo-spheres-mlflow-clients"]["spec"]
    peers = mlflow["ingress"][0]["from"]
    assert {"podSelector": {"matchExpressions": [{"key": k8s_deploy.JOB_POD, "operator": "Exists"}]}} in peers


@pytest.mark.parametrize("gpus", [0, 1, 2])
@pytest.mark.parametrize("per_gpu", [1, 2])
def test_the_rendered_env_gives_the_service_the_workers_its_gpus_and_per_gpu_setting_make(gpus, per_gpu, monkeypatch):
    """GPU pods carry no VOXELFLOW_SERVE_WORKERS: the service runs one worker per GPU slot (the pod's GPUs x
    VOXELFLOW_SERVE_PER_GPU, from the Secret); CPU pods one per requested core."""
    from voxelflow.serving import serve_gpu
    from voxelflow.spec.config import Settings

    dep = rendered(f"deploy.kubernetes.gpu={gpus}", "deploy.kubernetes.cpu_request=3000m")
    (c,) = dep["Deployment/demo-spheres-inference"]["spec"]["template"]["spec"]["containers"]
    for name in ("VOXELFLOW_SERVE_WORKERS", "VOXELFLOW_SERVE_PER_GPU"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VOXELFLOW_SERVE_PER_GPU", str(per_gpu))  # as the Secret (envFrom) may set it
    for e in c["env"]:
        monkeypatch.setenv(e["name"], e["value"])
    settings = Settings()
    placed = serve_gpu.plan(gpus, settings.serve_per_gpu, settings.serve_workers, cores=16)
    assert placed.workers == (gpus * per_gpu if gpus else 3)
    assert placed.slots == gpus * per_gpu
