"""deployments/prefect.yaml and the Kubernetes work pools' job templates, checked offline.

Every deployment names a real flow; every stage the lifecycle can place has its per-pool deployments;
the lifecycles queue rather than overlap. For each Kubernetes deployment the Job the worker would
submit is rendered with prefect-kubernetes' own job configuration (and with voxelflow.serving.k8s_jobs, which
must agree) and validated against the Kubernetes API schema with kubernetes-validate, like
tests/infra/test_manifests.py does for infra/kubernetes/.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import re
import types
import uuid
from functools import cache
from pathlib import Path

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")
pytest.importorskip("prefect_kubernetes")

from voxelflow.serving import k8s_jobs  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PREFECT_YAML = REPO / "deployments" / "prefect.yaml"
TEMPLATES = REPO / "infra" / "prefect"
K8S_VERSION = "1.33.0"  # as in test_manifests.py
NAMESPACE = "voxelflow"

PROCESS_POOLS = ("cpu", "gpu")
KUBERNETES_POOLS = {"k8s-cpu": TEMPLATES / "k8s-cpu-job-template.json",
                    "k8s-gpu": TEMPLATES / "k8s-gpu-job-template.json"}
# The lifecycle's stages (flow names, as flows/lifecycle.py calls them) and the spec section that places each.
SPEC_SECTION = {"ingest": "data", "preprocess": "preprocess", "train": "train", "evaluate": "evaluate",
                "register-and-promote": "promote", "deploy": "deploy"}
GPU_STAGES = {"preprocess", "train", "evaluate", "step"}
PLACED = {**SPEC_SECTION, "step": "steps"}  # the placed flows: the stages, and a step of the spec's own (step/POOL)
RUNTIME_ENV = ("VOXELFLOW_STORE", "VOXELFLOW_DATABASE_URL", "VOXELFLOW_MLFLOW_TRACKING_URI")
SPOT_SELECTORS = {("karpenter.sh/capacity-type", "spot"), ("cloud.google.com/gke-spot", "true")}

PREFECT_FILE = yaml.safe_load(PREFECT_YAML.read_text())
DEPLOYMENTS = PREFECT_FILE["deployments"]


# flows that are neither the lifecycle nor its stages
ARRIVAL_FLOWS = {"ingest-arrived", "rollback", "predict", "predict-arrived"}


@cache
def flow_of(entrypoint: str):
    path, _, func = entrypoint.partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return getattr(module, func)


def full_name(d: dict) -> str:
    return f"{flow_of(d['entrypoint']).name}/{d['name']}"


@cache
def by_name() -> dict[str, dict]:
    return {full_name(d): d for d in DEPLOYMENTS}


def k8s_deployments() -> list[dict]:
    return [d for d in DEPLOYMENTS if d["work_pool"]["name"] in KUBERNETES_POOLS]


def dep_id(d: dict) -> str:
    return f"{d['entrypoint'].split(':')[1]}/{d['name']}"


# --------------------------------------------------------------------------- the prefect.yaml


def test_prefect_accepts_the_file():
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(PREFECT_FILE)
    assert len(model.deployments) == len(DEPLOYMENTS)
    assert len(model.build) == 1 and PREFECT_FILE["push"] is None  # the engine command (below); no image


@pytest.mark.parametrize("d", DEPLOYMENTS, ids=lambda d: dep_id(d))
def test_entrypoint_is_a_flow_of_the_lifecycle(d):
    from prefect import Flow

    path = d["entrypoint"].partition(":")[0]
    assert (REPO / path).is_file(), path
    flow = flow_of(d["entrypoint"])
    assert isinstance(flow, Flow), f"{d['entrypoint']} is not a @flow"
    assert flow.name in {"lifecycle", *ARRIVAL_FLOWS, *PLACED}, flow.name
    assert d.get("work_pool", {}).get("name"), f"{full_name(d)} has no work pool"


def test_stage_flow_names_are_the_ones_the_lifecycle_calls():
    from flows.stages import RESULTS

    assert set(RESULTS) == set(PLACED)
    stage_flows = {flow_of(d["entrypoint"]).name for d in DEPLOYMENTS} - {"lifecycle", *ARRIVAL_FLOWS}
    assert stage_flows == set(PLACED)


def test_deployment_names_are_unique():
    names = [full_name(d) for d in DEPLOYMENTS]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def test_stage_deployments_are_named_after_their_pool():
    """The lifecycle runs `work_pool: X` as STAGE/X: the deployment name must be the pool it runs on."""
    for d in DEPLOYMENTS:
        if flow_of(d["entrypoint"]).name in PLACED:
            assert d["name"] == d["work_pool"]["name"], full_name(d)


@pytest.mark.parametrize("stage", list(PLACED))
def test_every_stage_has_process_and_kubernetes_deployments(stage):
    names = by_name()
    assert f"{stage}/cpu" in names and f"{stage}/k8s-cpu" in names
    if stage in GPU_STAGES:
        assert f"{stage}/gpu" in names and f"{stage}/k8s-gpu" in names
    # the two families mirror each other: a process-pool placement has a Kubernetes twin
    for pool in PROCESS_POOLS:
        assert (f"{stage}/{pool}" in names) == (f"{stage}/k8s-{pool}" in names), (stage, pool)


def test_process_pool_deployments_use_the_worker_environment():
    """No environment of their own; one process per flow run (`command` set: no supervisor process first)."""
    import shlex
    import sys

    from prefect.utilities.schema_tools import validate
    from prefect.workers.process import ProcessWorker

    from flows.deploy_steps import ENGINE_PRELOAD, engine_command

    (step,) = PREFECT_FILE["build"]
    assert step == {"flows.deploy_steps.engine_command": {"id": "engine"}}
    command = engine_command()["command"]
    assert shlex.split(command) == [sys.executable, "-m", "voxelflow.core.warm", "--preload", ",".join(ENGINE_PRELOAD),
                                    "prefect.engine"]  # this env's
    variables = ProcessWorker.get_default_base_job_template()["variables"]
    for d in DEPLOYMENTS:
        if d["work_pool"]["name"] not in KUBERNETES_POOLS:
            assert d["work_pool"].get("job_variables") == {"command": "{{ engine.command }}"}, full_name(d)
            assert not validate({"command": command}, variables, raise_on_error=False, preprocess=True,
                                ignore_required=True, allow_none_with_default=True), full_name(d)
            assert not d.get("pull"), f"{full_name(d)}: process pools run in the directory `prefect deploy` ran in"


# --------------------------------------------------------------------------- lifecycles


def lifecycles() -> list[dict]:
    return [d for d in DEPLOYMENTS if flow_of(d["entrypoint"]).name == "lifecycle"]


def test_lifecycle_deployments():
    names = {d["name"]: d for d in lifecycles()}
    assert set(names) == {"demo-spheres", "cpu", "k8s-cpu"}
    demo = names["demo-spheres"]
    assert demo["work_pool"]["name"] == "voxelflow-process"
    assert demo["parameters"] == {"spec": "deployments/specs/demo.yaml", "overlays": []}
    assert [s.get("active") for s in demo["schedules"]] == [False]
    assert names["cpu"]["work_pool"]["name"] == "cpu"
    assert names["k8s-cpu"]["work_pool"]["name"] == "k8s-cpu"


@pytest.mark.parametrize("d", lifecycles(), ids=lambda d: d["name"])
def test_lifecycles_queue_instead_of_overlapping(d):
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy

    limit = d["concurrency_limit"]
    assert limit["limit"] == 1
    assert ConcurrencyLimitStrategy(limit["collision_strategy"]) is ConcurrencyLimitStrategy.ENQUEUE


@pytest.mark.parametrize("d", [d for d in lifecycles() if "spec" in d["parameters"]], ids=lambda d: d["name"])
def test_lifecycle_places_stages_on_deployed_pools(d):
    """Load the spec with the deployment's overlays: every `work_pool` it names must have STAGE/POOL."""
    from voxelflow.spec.config import load_spec

    params = d["parameters"]
    for path in [params["spec"], *params.get("overlays", [])]:
        assert (REPO / path).is_file(), path
    spec = load_spec(REPO / params["spec"], [REPO / p for p in params.get("overlays", [])])
    placed = {stage: getattr(spec, section).work_pool for stage, section in SPEC_SECTION.items()}
    for stage, pool in placed.items():
        if pool is not None:
            assert f"{stage}/{pool}" in by_name(), f"{full_name(d)} places {stage} on {pool!r}: no {stage}/{pool}"
    for step in spec.steps:
        if step.work_pool is not None:
            assert f"step/{step.work_pool}" in by_name(), f"{full_name(d)} places step {step.id}: no step/{step.work_pool}"
    expected_train = {"cpu": "gpu", "k8s-cpu": "k8s-gpu"}.get(d["name"])
    assert placed["train"] == expected_train


def test_rollback_has_a_deployment():
    d = by_name()["rollback/demo"]
    assert d["parameters"] == {"model_name": "demo-spheres"}
    assert d["work_pool"]["name"] == "voxelflow-process"


def test_arrival_triggers_chain_ingest_and_lifecycle():
    """watch -> voxelflow.data.arrived -> ingest-arrived/demo-spheres -> voxelflow.dataset.updated ->
    lifecycle/demo-spheres."""
    names = by_name()
    arrival, update = names["ingest-arrived/demo-spheres"], names["lifecycle/demo-spheres"]
    (a,) = arrival["triggers"]
    assert a["expect"] == ["voxelflow.data.arrived"]
    assert a["match"]["voxelflow.route"] == "source"  # a folder's arrivals; the spool's go to predict-arrived
    (r,) = names["predict-arrived/demo-spheres"]["triggers"]
    assert r["expect"] == ["voxelflow.data.arrived"] and r["match"]["voxelflow.route"] == "spool"
    assert a["parameters"]["source"] == "{{ event.payload.source }}"
    (u,) = update["triggers"]
    assert u["expect"] == ["voxelflow.dataset.updated"]
    assert u["parameters"]["sets"] == ["data.source={{ event.payload.source }}"]
    assert u["parameters"]["dataset"] == "{{ event.payload.dataset_digest }}"  # it starts from what ingest recorded
    assert update["concurrency_limit"]["collision_strategy"] == "ENQUEUE"  # repeated updates queue, never overlap


DEMO_SPEC = "deployments/specs/demo.yaml"


def up_shape(d: dict) -> dict:
    """A shipped entry in the shape of flows.up.plan's, where the two can be compared."""
    return {"flow": flow_of(d["entrypoint"]).name, "name": d["name"], "entrypoint": d["entrypoint"],
            "tags": sorted(d.get("tags", [])), "description": d.get("description"),
            "parameters": d.get("parameters", {}), "work_pool": d["work_pool"]["name"],
            "concurrency_limit": d.get("concurrency_limit"), "triggers": d.get("triggers", []),
            "schedules": [{"cron": s["cron"], "timezone": s.get("timezone", "UTC"), "active": s.get("active", True)}
                          for s in d.get("schedules", [])]}


def test_the_shipped_demo_deployments_are_what_voxelflow_up_makes():
    """The demo pipeline's deployments in the file are `voxelflow up deployments/specs/demo.yaml`'s, under the
    same names (so deploying both ways still leaves one lifecycle deployment), with every parameter, trigger,
    limit and schedule equal. Only the spec's digest differs, on purpose: `up` records it (the parameter
    spec_digest, which makes a run refuse a spec edited since, and a tag); the file leaves it out, since
    `prefect deploy` cannot compute it and a pinned one would refuse `--param spec=PATH` and every edit of the
    demo spec until the file is edited too (tests/unit/test_spec_digest.py pins the demo spec's digest)."""
    from flows.up import plan
    from voxelflow.data.watch import resource_id
    from voxelflow.spec.config import load_spec

    spec = load_spec(REPO / DEMO_SPEC)
    digest = spec.digest()
    want = {}
    for d in plan(spec, DEMO_SPEC):
        assert d["parameters"].pop("spec_digest") == digest
        tags = sorted(d["tags"])
        tags.remove(f"voxelflow.spec-digest:{digest}")
        want[f"{d['flow']}/{d['name']}"] = {**d, "tags": tags}
    assert set(want) == {f"{flow}/demo-spheres" for flow in ("lifecycle", "ingest-arrived", "predict",
                                                             "predict-arrived")}  # the spec's triggers ask for all
    got = {full_name(d): up_shape(d) for d in DEPLOYMENTS if d["name"] == spec.name}
    assert set(got) == set(want)
    for name in want:
        assert got[name] == want[name], (f"deployments/prefect.yaml's {name} is not what `voxelflow up {DEMO_SPEC}` "
                                         "makes (flows/up.py): make them agree")
    # and nothing else in the file is started by the pipeline's events: no second trigger, no generic deployment
    others = [full_name(d) for d in DEPLOYMENTS if full_name(d) not in want
              and any(tr["match"]["prefect.resource.id"] == resource_id(spec.name) for tr in d.get("triggers", []))]
    assert others == []


def test_one_lifecycle_deployment_per_pipeline_starts_by_itself():
    """Prefect's concurrency limit is per deployment: of a pipeline's lifecycle deployments in the file, one
    alone has a schedule or a trigger. The others (the demo pipeline placed on other pools) start only when
    someone runs them, as alternatives to it (infra/README.md)."""
    from voxelflow.spec.config import load_spec

    starting: dict[str, list[str]] = {}
    for d in lifecycles():
        params = d["parameters"]
        name = load_spec(REPO / params["spec"], [REPO / o for o in params.get("overlays", [])]).name
        if d.get("schedules") or d.get("triggers"):
            starting.setdefault(name, []).append(full_name(d))
    assert starting == {"demo-spheres": ["lifecycle/demo-spheres"]}


def triggered() -> list[dict]:
    return [d for d in DEPLOYMENTS if d.get("triggers")]


@pytest.mark.parametrize("d", triggered(), ids=dep_id)
def test_a_triggered_deployment_runs_its_own_spec_for_its_own_pipeline_only(d):
    """The spec is the deployment's parameter, never the event's; the trigger matches that spec's pipeline
    only; the event reaches the run as `announcement` (id, event, resource, payload keys), which it checks."""
    import inspect

    from voxelflow.data.watch import DATA_ARRIVED, ROUTE_LABEL, ROUTE_SOURCE, ROUTE_SPOOL, resource_id
    from voxelflow.spec.config import load_spec

    spec = load_spec(REPO / d["parameters"]["spec"])
    assert "announcement" in inspect.signature(flow_of(d["entrypoint"]).fn).parameters
    for trigger in d["triggers"]:
        match = dict(trigger["match"])
        assert match.pop("prefect.resource.id") == resource_id(spec.name), full_name(d)
        # besides the pipeline, an arrival's route only: a watched source, or the spool of received series
        assert match == ({ROUTE_LABEL: ROUTE_SOURCE if d["entrypoint"] == "flows/ingest.py:ingest" else ROUTE_SPOOL}
                         if trigger["expect"] == [DATA_ARRIVED] else {}), full_name(d)
        params = trigger["parameters"]
        assert "spec" not in params and "overlays" not in params, full_name(d)
        assert params["announcement"] == {"id": "{{ event.id | string }}", "event": "{{ event.event }}",
                                          "resource": "{{ event.resource.id }}", "keys": "{{ event.payload | list }}"}
        templated = yaml.safe_dump({k: v for k, v in params.items() if k != "announcement"})
        assert "event.payload" not in templated.replace("event.payload.source", "").replace(
            "event.payload.cases", "").replace("event.payload.dataset_digest", ""), \
            f"{full_name(d)} takes more than data references from the event"


# --------------------------------------------------------------------------- Kubernetes job templates


@cache
def template(pool: str) -> dict:
    return json.loads(KUBERNETES_POOLS[pool].read_text())


@cache
def default_template() -> dict:
    from prefect_kubernetes.worker import KubernetesWorker

    return KubernetesWorker.get_default_base_job_template()


@pytest.mark.parametrize("pool", list(KUBERNETES_POOLS))
def test_shipped_template_is_derived_from_the_installed_default(pool):
    """Regenerate with `python -m voxelflow.serving.k8s_jobs` (see its docstring) after upgrading prefect-kubernetes."""
    assert template(pool) == k8s_jobs.job_template(default_template(), gpu=pool == "k8s-gpu")


@pytest.mark.parametrize("pool", list(KUBERNETES_POOLS))
def test_template_variables_are_a_valid_schema_with_every_placeholder_declared(pool):
    from prefect.utilities.schema_tools import is_valid_schema
    from prefect.utilities.templating import find_placeholders

    t = template(pool)
    is_valid_schema(t["variables"], preprocess=False)
    declared = set(t["variables"]["properties"])
    used = {p.name for p in find_placeholders(t["job_configuration"])}
    assert used <= declared, used - declared


def test_the_stock_template_cannot_take_env_from_a_secret():
    """Why the k8s-cpu pool has a template of its own too: the stock `env` is a mapping of strings."""
    from prefect.utilities.schema_tools import validate

    env = [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]
    assert validate({"env": env}, default_template()["variables"], raise_on_error=False, preprocess=True,
                    ignore_required=True, allow_none_with_default=True)


@pytest.mark.parametrize("d", k8s_deployments(), ids=dep_id)
def test_job_variables_pass_the_servers_validation(d):
    """What the API checks on `prefect deploy` (prefect.server.api.validation)."""
    from prefect.utilities.schema_tools import validate

    t = template(d["work_pool"]["name"])
    errors = validate(d["work_pool"]["job_variables"], t["variables"], raise_on_error=False, preprocess=True,
                      ignore_required=True, allow_none_with_default=True)
    assert not errors, [e.message for e in errors]
    unknown = set(d["work_pool"]["job_variables"]) - set(t["variables"]["properties"])
    assert not unknown, f"job variables the template ignores: {unknown}"


def worker_job(d: dict, pool: str | None = None) -> tuple[dict, dict]:
    """(voxelflow.serving.k8s_jobs' rendering, the Job prefect-kubernetes' worker submits for a flow run)."""
    from prefect.client.schemas.objects import Flow, FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    t = template(pool or d["work_pool"]["name"])
    job_variables = d["work_pool"]["job_variables"]
    ours = k8s_jobs.render_job(t, job_variables)
    config = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(
        t, job_variables, client=types.SimpleNamespace()))  # no block/variable placeholders: never called
    # The same templating: both configurations are equal once through prefect's model.
    assert KubernetesWorkerJobConfiguration(**k8s_jobs.render_configuration(t, job_variables)) == config
    flow = flow_of(d["entrypoint"])
    config.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), flow_id=uuid.uuid4(), name="brave-otter"),
                                flow=Flow(id=uuid.uuid4(), name=flow.name), worker_name="k8s-worker")
    return ours, config.job_manifest


def pod_spec(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


def container(job: dict) -> dict:
    (c,) = pod_spec(job)["containers"]
    return c


@pytest.mark.parametrize("d", k8s_deployments(), ids=dep_id)
def test_rendered_job_is_valid_for_kubernetes(d):
    ours, job = worker_job(d)
    assert ours["kind"] == job["kind"] == "Job" and container(ours)["image"] == container(job)["image"]
    job = json.loads(json.dumps(job))
    # prefect-kubernetes puts two Job fields in the pod template (and requires them there); the API
    # server drops unknown fields with a warning. Anything else unknown fails strict validation.
    spec = pod_spec(job)
    assert (spec.pop("parallelism"), spec.pop("completions")) == (1, 1)
    try:
        validated = kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path) or "(top level)"
        pytest.fail(f"{dep_id(d)}: not a valid Job for Kubernetes {K8S_VERSION}: {where}: {exc.message}")
    assert validated == ".".join(K8S_VERSION.split(".")[:2])


def parse_quantity(value) -> float:
    suffixes = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    number, unit = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value)).groups()
    return float(number) * suffixes.get(unit, 1)


@pytest.mark.parametrize("d", k8s_deployments(), ids=dep_id)
def test_job_runs_the_voxelflow_image_in_its_namespace_as_non_root(d):
    _, job = worker_job(d)
    c = container(job)
    project_version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    repo, _, tag = c["image"].rpartition(":")
    assert repo.rsplit("/", 1)[-1] == "voxelflow" and tag.startswith(project_version), c["image"]
    assert job["metadata"]["namespace"] == NAMESPACE  # the worker's Role is namespaced (infra/kubernetes)
    assert c["args"][:3] == ["prefect", "flow-run", "execute"]
    resources = c["resources"]
    for res in ("cpu", "memory"):
        assert parse_quantity(resources["requests"][res]) <= parse_quantity(resources["limits"][res]), res
    assert pod_spec(job)["securityContext"]["runAsNonRoot"] is True
    assert pod_spec(job)["securityContext"]["runAsUser"] == k8s_jobs.UID
    assert c["securityContext"]["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize("d", k8s_deployments(), ids=dep_id)
def test_job_runs_in_the_images_workdir(d):
    """No pull step would make the worker chdir to wherever `prefect deploy` ran: not inside the image."""
    workdir = re.search(r"^WORKDIR\s+(\S+)", (REPO / "infra" / "Dockerfile").read_text(), re.M).group(1)
    assert d["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": workdir}}]


@pytest.mark.parametrize("d", k8s_deployments(), ids=dep_id)
def test_addresses_come_from_a_secret_and_no_secret_is_inline(d):
    _, job = worker_job(d)
    env = {e["name"]: e for e in container(job)["env"]}
    secrets = set()
    for name in RUNTIME_ENV:
        assert "value" not in env[name], f"{name} is written into the Job"
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["key"] == name and not ref.get("optional")
        secrets.add(ref["name"])
    assert secrets == {"voxelflow-runtime"}
    # nothing that looks like a credential in the deployment's job variables
    text = json.dumps(d["work_pool"]["job_variables"])
    assert not re.search(r"://[^/\s\"]*:[^/\s\"]*@", text), "a URL with a password"
    literal = [e["name"] for e in d["work_pool"]["job_variables"].get("env", []) if "value" in e]
    assert not [n for n in literal if re.search(r"KEY|SECRET|TOKEN|PASSWORD|URL|URI|STORE", n)], literal


def test_the_runtime_secret_is_documented():
    readme = (REPO / "infra" / "README.md").read_text()
    assert "voxelflow-runtime" in readme
    for name in RUNTIME_ENV:
        assert name in readme


def test_training_job_gets_a_spot_gpu():
    _, job = worker_job(by_name()["train/k8s-gpu"])
    resources = container(job)["resources"]
    assert str(resources["limits"]["nvidia.com/gpu"]) == str(resources["requests"]["nvidia.com/gpu"]) == "1"
    spec = pod_spec(job)
    assert set(spec["nodeSelector"].items()) & SPOT_SELECTORS, spec["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" and t["operator"] == "Exists" and t.get("effect") == "NoSchedule"
               for t in spec["tolerations"])
    # a reclaimed spot node SIGTERMs the pod: with backoffLimit 0 the worker has the run rescheduled
    assert job["spec"]["backoffLimit"] == 0
    env = {e["name"]: e.get("value") for e in container(job)["env"]}
    assert env["PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"] == "reschedule"


def test_gpu_jobs_mount_an_in_memory_dev_shm_that_validates():
    """NCCL with more than one GPU, and DataLoader workers, pass tensors through /dev/shm: a container's
    default 64 MiB fails them."""
    bare = {"entrypoint": "flows/stages.py:train_flow", "name": "bare", "work_pool": {"job_variables": {}}}
    for job_variables, size in (({}, "8Gi"), ({"shm_size": "32Gi"}, "32Gi")):
        _, job = worker_job({**bare, "work_pool": {"job_variables": job_variables}}, pool="k8s-gpu")
        volumes = {v["name"]: v for v in pod_spec(job)["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container(job)["volumeMounts"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": size}
        job = json.loads(json.dumps(job))
        pod_spec(job).pop("parallelism"), pod_spec(job).pop("completions")  # as in the test above
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    _, job = worker_job(by_name()["train/k8s-gpu"])
    assert "/dev/shm" in {m["mountPath"] for m in container(job).get("volumeMounts", [])}


def test_cpu_jobs_get_no_gpu():
    for d in k8s_deployments():
        if d["work_pool"]["name"] == "k8s-cpu":
            _, job = worker_job(d)
            assert not any("nvidia.com/gpu" in r for r in container(job)["resources"].values()), dep_id(d)


def test_gpu_pool_defaults_to_one_gpu_with_its_toleration():
    """A deployment on k8s-gpu that sets no job variables still lands on a GPU node."""
    bare = {"entrypoint": "flows/stages.py:train_flow", "name": "bare", "work_pool": {"job_variables": {}}}
    _, job = worker_job(bare, pool="k8s-gpu")
    assert str(container(job)["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec(job)["tolerations"]
    assert job["metadata"]["namespace"] == NAMESPACE


# --------------------------------------------------------------------------- voxelflow.serving.k8s_jobs


def test_render_job_follows_prefects_templating():
    from prefect.utilities.templating import apply_values

    t = {"job_configuration": {"job_manifest": {
        "whole": "{{ a }}", "text": "x-{{ a }}-{{ missing }}", "gone": "{{ missing }}", "list": ["{{ b }}", "{{ missing }}"],
        "nested": "{{ c.d }}", "index": "{{ e[1] }}", "block": "{{ prefect.blocks.secret.x }}", "n": 3, "none": None}},
        "variables": {"properties": {"a": {"default": 1}, "b": {"default": None}, "c": {"default": {"d": "D"}},
                                     "e": {"default": [0, "one"]}}}}
    values = k8s_jobs.template_values(t, {"b": [1, 2], "c.f": "F"})
    assert values == {"a": 1, "b": [1, 2], "c": {"f": "F"}, "e": [0, "one"]}  # a plain key wins over defaults
    assert k8s_jobs.render_job(t, {"b": [1, 2]}) == apply_values(t["job_configuration"], {**values, "c": {"d": "D"}})[
        "job_manifest"]
    assert k8s_jobs.render_job(t, {}) == {"whole": 1, "text": "x-1-", "list": [], "nested": "D", "index": "one",
                                          "block": "{{ prefect.blocks.secret.x }}", "n": 3, "none": None}


def test_k8s_jobs_does_not_import_prefect():
    source = Path(k8s_jobs.__file__).read_text()
    assert not re.search(r"^\s*(import|from)\s+prefect", source, re.M)
