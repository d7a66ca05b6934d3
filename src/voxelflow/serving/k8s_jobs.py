"""Kubernetes work-pool job templates: derive voxelflow's from prefect-kubernetes' default, render a Job.

Prefect's Kubernetes worker turns a work pool's *base job template* (``job_configuration`` with
``{{ placeholders }}`` plus a JSON schema of ``variables``) and a deployment's ``job_variables`` into
the Job it submits. This module does the same without importing prefect, for previews and tests:

- :func:`render_job` fills ``job_configuration.job_manifest`` the way
  ``BaseJobConfiguration.from_template_and_values`` does (variable defaults, overridden by the job
  variables; ``prefect.utilities.templating.apply_values`` substitution). The worker then adds its
  own env, labels and command (``prepare_for_flow_run``); that part is not reproduced here.
- :func:`job_template` derives the templates shipped under ``infra/prefect/`` from the default one,
  which takes it as data (``prefect work-pool get-default-base-job-template --type kubernetes``)::

      python -m voxelflow.serving.k8s_jobs default.json cpu > infra/prefect/k8s-cpu-job-template.json
      python -m voxelflow.serving.k8s_jobs default.json gpu > infra/prefect/k8s-gpu-job-template.json
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

# prefect.utilities.templating.PLACEHOLDER_CAPTURE_REGEX
_PLACEHOLDER = re.compile(r"({{\s*([\w\.\-\[\]$]+)\s*}})")
_UNSET = object()

NAMESPACE = "voxelflow"
UID = 10001  # the image's numeric USER (infra/Dockerfile)
GPU_RESOURCE = "nvidia.com/gpu"


# --------------------------------------------------------------------------- rendering


def _lookup(values: Any, name: str) -> Any:
    """``prefect.utilities.collections.get_from_dict``: a dotted path with ``[i]`` list indices."""
    value = values
    for key in name.replace("[", ".").replace("]", "").split("."):
        try:
            if isinstance(value, Mapping):
                if key not in value and key.lstrip("-").isdigit() and str(int(key)) == key:
                    key = int(key)  # {"years": {2026: ...}} answers "years.2026"
            elif key.lstrip("-").isdigit():
                key = int(key)
            value = value[key]
        except (TypeError, KeyError, IndexError):
            return _UNSET
    return value


def _kind(name: str) -> str:
    if name.startswith(("prefect.blocks.", "prefect.variables.")):
        return "resolved-later"  # block documents and Prefect variables: the worker asks the API
    return "env" if name.startswith("$") else "standard"


def apply_values(template: Any, values: Mapping[str, Any]) -> Any:
    """Replace ``{{ name }}`` placeholders like Prefect: a string that is one placeholder becomes the
    value itself (any type); placeholders inside longer strings are replaced by ``str(value)``; a key
    or list item whose lone placeholder has no value is dropped, a missing value inside text is ''."""
    if template is None or isinstance(template, (bool, int, float)):
        return template
    if isinstance(template, str):
        found = set(_PLACEHOLDER.findall(template))
        if not found:
            return template
        if len(found) == 1:
            ((full, name),) = found
            if full == template and _kind(name) == "standard":
                value = _lookup(values, name)
                return value if value is _UNSET else copy.deepcopy(value)
        replacements = {}
        for full, name in found:
            kind = _kind(name)
            if kind == "standard":
                value = _lookup(values, name)
            elif kind == "env":
                value = os.environ.get(name.lstrip("$"), _UNSET)
            else:
                continue
            replacements[full] = "" if value is _UNSET else str(value)
        return _PLACEHOLDER.sub(lambda m: replacements.get(m.group(1), m.group(1)), template)
    if isinstance(template, Mapping):
        out = {k: apply_values(v, values) for k, v in template.items()}
        return {k: v for k, v in out.items() if v is not _UNSET}
    if isinstance(template, list):
        return [v for v in (apply_values(item, values) for item in template) if v is not _UNSET]
    raise ValueError(f"unexpected template type {type(template).__name__!r}")


def _deep_merge(base: dict, over: Mapping) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if isinstance(out.get(key), dict) and isinstance(value, dict) else value
    return out


def template_values(base_job_template: Mapping[str, Any], job_variables: Mapping[str, Any]) -> dict[str, Any]:
    """The values placeholders are filled from: the variables' non-null defaults, overridden by the job
    variables (``env.FOO: x`` style keys nested first, plain keys merged over them)."""
    properties = base_job_template.get("variables", {}).get("properties", {})
    values = {name: copy.deepcopy(attrs["default"]) for name, attrs in properties.items()
              if attrs.get("default") is not None}
    overrides: dict[str, Any] = {}
    for key, value in job_variables.items():
        if "." in key:
            node = overrides
            *parents, last = key.replace("[", ".").replace("]", "").split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
    for key, value in job_variables.items():
        if "." not in key:
            if isinstance(overrides.get(key), dict) and isinstance(value, dict):
                overrides[key] = _deep_merge(overrides[key], value)
            else:
                overrides[key] = value
    values.update(overrides)
    return values


def render_configuration(base_job_template: Mapping[str, Any], job_variables: Mapping[str, Any]) -> dict[str, Any]:
    """The whole filled ``job_configuration`` (job manifest, namespace, env, timeouts...)."""
    values = template_values(base_job_template, job_variables)
    return apply_values(copy.deepcopy(dict(base_job_template["job_configuration"])), values)


def render_job(base_job_template: Mapping[str, Any], job_variables: Mapping[str, Any]) -> dict[str, Any]:
    """The Job manifest the worker starts from for a deployment with these job variables, before it adds
    the flow run's env, labels, generated name and command. ``env`` given as a mapping stays a mapping
    here (the worker turns it into a list of ``{name, value}``)."""
    return render_configuration(base_job_template, job_variables)["job_manifest"]


# --------------------------------------------------------------------------- voxelflow's templates


_ENV_VAR_SCHEMA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string"},
        "value": {"type": "string"},
        "valueFrom": {"type": "object", "description": "e.g. {secretKeyRef: {name: SECRET, key: KEY}}"},
    },
}

_PLACEMENT_VARIABLES = {
    "node_selector": {
        "title": "Node Selector",
        "description": "The pod's nodeSelector, e.g. {karpenter.sh/capacity-type: spot}. Unset: any node.",
        "type": "object",
        "additionalProperties": {"type": "string"},
    },
    "tolerations": {
        "title": "Tolerations",
        "description": "The pod's tolerations (Kubernetes Toleration objects).",
        "type": "array",
        "items": {"type": "object"},
    },
}

_GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}


def job_template(default_template: Mapping[str, Any], *, gpu: bool = False) -> dict[str, Any]:
    """voxelflow's base job template for a Kubernetes work pool, derived from prefect-kubernetes' default.

    Adds to it: ``env`` may also be a list of Kubernetes EnvVar objects (so a deployment can take
    values from a Secret with ``valueFrom.secretKeyRef`` instead of writing them into the Job);
    ``node_selector`` and ``tolerations``; a restricted-profile securityContext (the image's UID
    10001); the ``voxelflow`` namespace as the default. With ``gpu``: ``gpu_count`` (default 1)
    requested and limited as ``nvidia.com/gpu``, a default toleration of the ``nvidia.com/gpu`` taint,
    and an in-memory ``/dev/shm`` of ``shm_size`` (default 8Gi), which NCCL needs with several GPUs.
    """
    template = copy.deepcopy(dict(default_template))
    variables = template["variables"]
    props = variables["properties"]

    env = props["env"]
    object_form = {k: v for k, v in env.items() if k not in ("title", "description")}
    props["env"] = {
        "title": env.get("title", "Environment Variables"),
        "description": "Environment variables for the flow-run container: a mapping NAME: value, or a list of "
        "Kubernetes EnvVar objects ({name, value} or {name, valueFrom: {secretKeyRef: {name, key}}}).",
        "anyOf": [object_form, {"type": "array", "items": _ENV_VAR_SCHEMA}],
    }
    props["namespace"]["default"] = NAMESPACE
    props.update(copy.deepcopy(_PLACEMENT_VARIABLES))
    if gpu:
        props["gpu_count"] = {
            "title": "GPUs",
            "description": f"{GPU_RESOURCE} requested (and limited) for the flow-run container.",
            "type": "integer",
            "minimum": 0,
            "default": 1,
        }
        props["tolerations"]["default"] = [dict(_GPU_TOLERATION)]
        props["shm_size"] = {
            "title": "Shared memory",
            "description": "size of the in-memory /dev/shm of the flow-run container: NCCL and DataLoader worker "
            "processes pass tensors through it, and a container's default (64 MiB) fails them",
            "type": "string",
            "default": "8Gi",
        }

    manifest = template["job_configuration"]["job_manifest"]
    pod = manifest["spec"]["template"]["spec"]
    pod["nodeSelector"] = "{{ node_selector }}"
    pod["tolerations"] = "{{ tolerations }}"
    pod["securityContext"] = {
        "runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    (container,) = pod["containers"]
    container["securityContext"] = {
        "allowPrivilegeEscalation": False, "privileged": False, "capabilities": {"drop": ["ALL"]},
    }
    if gpu:
        for kind in ("requests", "limits"):
            container.setdefault("resources", {}).setdefault(kind, {})[GPU_RESOURCE] = "{{ gpu_count }}"
        pod.setdefault("volumes", []).append({"name": "dshm", "emptyDir": {"medium": "Memory",
                                                                         "sizeLimit": "{{ shm_size }}"}})
        container.setdefault("volumeMounts", []).append({"name": "dshm", "mountPath": "/dev/shm"})
    variables["description"] = (
        "voxelflow's variables for the Kubernetes worker: prefect-kubernetes' defaults plus env from Secrets, "
        "node placement" + (" and GPUs" if gpu else "") + " (generated by voxelflow.serving.k8s_jobs.job_template)."
    )
    return template


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in ("cpu", "gpu"):
        print("usage: python -m voxelflow.serving.k8s_jobs DEFAULT_TEMPLATE.json cpu|gpu", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        default = json.load(f)
    json.dump(job_template(default, gpu=argv[1] == "gpu"), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
