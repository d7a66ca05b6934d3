"""``deploy.target: kubernetes``: the inference service's manifests, rendered from the spec.

:func:`render` returns plain dicts (Deployment, Service, HorizontalPodAutoscaler,
PodDisruptionBudget, two NetworkPolicies); ``voxelflow deploy render SPEC`` prints them as YAML and
:func:`apply` sends them to the cluster the local kubeconfig (or the pod's service account)
names, by server-side apply. Settings reach the pods from a Secret (``deploy.kubernetes.secret``)
with ``VOXELFLOW_STORE``, ``VOXELFLOW_DATABASE_URL`` and ``VOXELFLOW_MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

from typing import Any

from voxelflow.config import DeploySpec, PipelineSpec

PORT = 8000
MLFLOW_ACCESS = "voxelflow.io/mlflow-access"


def cpu_cores(quantity: str) -> float:
    """A Kubernetes CPU quantity ("2", "500m", "1.5") in cores."""
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def render(spec: PipelineSpec) -> list[dict[str, Any]]:
    """The manifests that run ``spec``'s champion as a service on Kubernetes."""
    return render_for(spec.name, spec.promote.model_name, spec.deploy)


def render_for(pipeline: str, model_name: str, deploy: DeploySpec) -> list[dict[str, Any]]:
    if deploy.target != "kubernetes" or deploy.kubernetes is None:
        raise ValueError(f"deploy.target is {deploy.target!r}: set it to kubernetes to render manifests")
    k = deploy.kubernetes
    name, ns = f"{pipeline}-inference", k.namespace
    labels = {"app.kubernetes.io/name": "voxelflow-inference", "app.kubernetes.io/instance": pipeline,
              "app.kubernetes.io/part-of": "voxelflow", "app.kubernetes.io/component": "inference"}
    selector = {"app.kubernetes.io/name": labels["app.kubernetes.io/name"], "app.kubernetes.io/instance": pipeline}
    meta = {"name": name, "namespace": ns, "labels": labels}
    limits: dict[str, Any] = {"cpu": k.cpu_limit, "memory": k.memory_limit}
    pod_extra: dict[str, Any] = {}
    if k.gpu:
        limits["nvidia.com/gpu"] = k.gpu
        pod_extra = {
            "nodeSelector": dict(k.gpu_node_selector),
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        }
    probe = {"httpGet": {"path": "/health/live", "port": "http"}, "periodSeconds": 10, "timeoutSeconds": 2,
             "failureThreshold": 3}
    container = {
        "name": "inference",
        "image": k.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["voxelflow", "serve"],
        "args": [f"--model={model_name}", f"--alias={k.alias}", "--host=0.0.0.0", f"--port={PORT}"],
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "envFrom": [{"secretRef": {"name": k.secret}}],
        "env": [{"name": "VOXELFLOW_HOME", "value": "/tmp/voxelflow"},
                {"name": "VOXELFLOW_SERVE_WORKERS", "value": str(max(1, k.gpu or int(cpu_cores(k.cpu_request))))}],
        "resources": {"requests": {"cpu": k.cpu_request, "memory": k.memory_request}, "limits": limits},
        "startupProbe": {**probe, "failureThreshold": 60},
        "livenessProbe": probe,
        "readinessProbe": {**probe, "httpGet": {"path": "/health/ready", "port": "http"}},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
        "spec": {  # no replicas: the HorizontalPodAutoscaler owns the count
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": {**labels, MLFLOW_ACCESS: "true"}},
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                                        "fsGroup": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [container],
                    "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "2Gi"}}],
                    **pod_extra,
                },
            },
        },
    }
    service = {"apiVersion": "v1", "kind": "Service", "metadata": meta,
               "spec": {"type": "ClusterIP", "selector": selector,
                        "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}}
    a = k.autoscale
    if a.metric == "cpu":
        metric = {"type": "Resource", "resource": {"name": "cpu", "target": {
            "type": "Utilization", "averageUtilization": int(a.target)}}}
    else:  # served by a metrics adapter (e.g. prometheus-adapter) from the pods' /metrics
        metric = {"type": "Pods", "pods": {"metric": {"name": "voxelflow_queue_depth"},
                                           "target": {"type": "AverageValue", "averageValue": str(a.target)}}}
    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": meta,
           "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                    "minReplicas": a.min_replicas, "maxReplicas": a.max_replicas, "metrics": [metric]}}
    pdb = {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": meta,
           "spec": {"selector": {"matchLabels": selector}, "minAvailable": max(1, a.min_replicas - 1)}}
    dns = {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}}],
           "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}
    inference_policy = {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta,
        "spec": {
            "podSelector": {"matchLabels": selector},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{  # only the gateway may call the service (and the kubelet's probes, which policies allow)
                "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": allowed}}}
                         for allowed in k.allowed_namespaces],
                "ports": [{"protocol": "TCP", "port": PORT}],
            }],
            "egress": [
                dns,
                {"to": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}}],
                 "ports": [{"protocol": "TCP", "port": 5000}]},
                # the database and the object store live outside the cluster or in other namespaces
                {"ports": [{"protocol": "TCP", "port": p} for p in k.egress_ports]},
            ],
        },
    }
    mlflow_policy = {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": f"{pipeline}-mlflow-clients", "namespace": ns, "labels": labels},
        "spec": {
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {MLFLOW_ACCESS: "true"}}}],
                         "ports": [{"protocol": "TCP", "port": 5000}]}],
        },
    }
    return [deployment, service, hpa, pdb, inference_policy, mlflow_policy]


def to_yaml(docs: list[dict[str, Any]]) -> str:
    import yaml

    return "".join("---\n" + yaml.safe_dump(d, sort_keys=False) for d in docs)


def cluster_configured() -> str | None:
    """Where the cluster comes from (in-cluster or a kubeconfig context), or None when nothing names one."""
    import os
    from pathlib import Path

    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return "in-cluster service account"
    config = Path(os.environ.get("KUBECONFIG", "~/.kube/config").split(os.pathsep)[0]).expanduser()
    return f"kubeconfig {config}" if config.is_file() else None


def apply(docs: list[dict[str, Any]]) -> list[str]:
    """Server-side apply every manifest; returns ``kind/name`` of each. Raises when no cluster is configured."""
    where = cluster_configured()
    if where is None:
        raise RuntimeError("no Kubernetes cluster is configured (no in-cluster service account, no kubeconfig): "
                           "`voxelflow deploy render SPEC` prints the manifests to apply yourself")
    try:
        from kubernetes import config as kconfig
        from kubernetes import dynamic
        from kubernetes.client import api_client
    except ImportError as exc:
        raise RuntimeError("applying manifests needs the Kubernetes client: pip install 'voxelflow[k8s]'") from exc
    if where.startswith("in-cluster"):
        kconfig.load_incluster_config()
    else:
        kconfig.load_kube_config()
    client = dynamic.DynamicClient(api_client.ApiClient())
    done = []
    for doc in docs:
        resource = client.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
        resource.server_side_apply(body=doc, name=doc["metadata"]["name"], namespace=doc["metadata"]["namespace"],
                                   field_manager="voxelflow", force_conflicts=True)
        done.append(f"{doc['kind']}/{doc['metadata']['name']}")
    return done
