"""``voxelflow up SPEC [--pool P]`` and ``voxelflow down SPEC``: the deployments a spec's ``triggers`` need.

One lifecycle deployment per pipeline, ``lifecycle/<pipeline>``: concurrency limit 1 with ENQUEUE, the
spec's schedule, and the ``dataset_updated`` trigger, so every way of starting that pipeline's lifecycle
queues behind the one running; ``ingest-arrived/<pipeline>`` with the ``arrival`` trigger;
``predict/<pipeline>`` with the ``unlabelled`` trigger when ``unlabelled.predict``. Triggers match the
pipeline's resource (``voxelflow.dataset.<pipeline>``) and template only data references from the event's
payload. The spec is each deployment's ``spec`` parameter (its path); its digest is the ``spec_digest``
parameter (a run refuses a spec file edited since, :func:`verify`) and the tag ``voxelflow.spec-digest:<digest>``.
``predict-arrived/<pipeline>`` (received DICOM series, :mod:`voxelflow.serving.clinical`) has the ``arrival``
trigger too, and is made with either ``arrival`` or ``unlabelled.predict``.
A deployment that already is what the spec asks for is left alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

ROOT = Path(__file__).resolve().parent.parent  # the working directory of the process pools' flow runs
DEFAULT_POOL = "voxelflow-process"
ENTRYPOINTS = {"lifecycle": "flows/lifecycle.py:lifecycle", "ingest-arrived": "flows/ingest.py:ingest",
               "predict": "flows/predict.py:predict", "predict-arrived": "flows/predict.py:arrived"}
ANNOUNCEMENT = {"id": "{{ event.id | string }}", "event": "{{ event.event }}", "resource": "{{ event.resource.id }}",
                "keys": "{{ event.payload | list }}"}


def spec_ref(path: Path) -> str:
    """The spec's path as a flow run reads it: relative to the project root when under it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def verify(spec: str, digest: str | None):
    """Refuse to run a deployment's spec whose file changed since ``voxelflow up`` recorded ``digest``; returns the
    spec as the file holds it (None without a ``digest``: nothing was loaded)."""
    if digest is None:
        return None
    from voxelflow.spec.config import load_spec

    loaded = load_spec(spec)
    now = loaded.digest()
    if now != digest:
        raise ValueError(f"the spec {spec} changed since `voxelflow up` made this deployment (digest {digest[:12]}, "
                         f"now {now[:12]}): run `voxelflow up {spec}` again to deploy the edit")
    return loaded


def begin(spec, spec_digest: str | None, event: str, announcement: dict | None, *, overlays=None, sets=None,
          data=None):
    """The start every deployment's flow shares: refuse a spec edited since ``voxelflow up`` (:func:`verify`), load
    it with ``overlays`` and ``sets`` (``spec`` may be a loaded spec already), open the run's
    :class:`~voxelflow.pipeline.Context` (settings from :func:`tasks.settings.run_settings`, over the spec's data
    or ``data(spec.data)``), and refuse a triggering ``announcement`` of ``event`` that concerns another pipeline
    or carries more than data references. Returns ``(spec, ctx)``."""
    from tasks.settings import run_settings
    from voxelflow.data.watch import accept_announcement
    from voxelflow.pipeline import Context
    from voxelflow.spec.config import load_spec

    if isinstance(spec, (str, Path)):
        as_filed = verify(str(spec), spec_digest)
        spec = as_filed if as_filed is not None and not overlays and not sets else load_spec(spec, overlays, sets)
    elif overlays or sets:
        raise ValueError("overlays and sets apply to a spec file: pass the spec as a path")
    ctx = Context(run_settings(data(spec.data) if data else spec.data), spec.name)
    if announcement is not None:
        accept_announcement(ctx.db, spec.name, announcement, event)
    return spec, ctx


def _trigger(pipeline: str, event: str, parameters: dict[str, Any], route: str | None = None) -> dict[str, Any]:
    """An event trigger on ``pipeline``'s resource; ``route``: only arrivals with that route label."""
    from voxelflow.data.watch import ROUTE_LABEL, resource_id

    match = {"prefect.resource.id": resource_id(pipeline), **({ROUTE_LABEL: route} if route else {})}
    return {"type": "event", "enabled": True, "match": match,
            "expect": [event], "parameters": {**parameters, "announcement": dict(ANNOUNCEMENT)}}


def plan(spec, ref: str, pool: str | None = None) -> list[dict[str, Any]]:
    """The deployments ``spec`` (loaded from ``ref``) needs, in the shape of deployments/prefect.yaml's entries."""
    from voxelflow.data.watch import CASES_UNLABELLED, DATA_ARRIVED, DATASET_UPDATED, ROUTE_SOURCE, ROUTE_SPOOL

    t, name, digest = spec.triggers, spec.name, spec.digest()
    pool = pool or spec.work_pool or DEFAULT_POOL
    tags = ["voxelflow", f"voxelflow.pipeline:{name}", f"voxelflow.spec-digest:{digest}"]
    enqueue = {"limit": 1, "collision_strategy": "ENQUEUE"}
    lifecycle = {"flow": "lifecycle", "name": name, "entrypoint": ENTRYPOINTS["lifecycle"], "tags": tags,
                 "description": f"The lifecycle of {name}: the one deployment that runs it (one at a time).",
                 "parameters": {"spec": ref, "overlays": [], "spec_digest": digest}, "work_pool": pool, "concurrency_limit": enqueue,
                 "schedules": [t.schedule.model_dump()] if t.schedule else [], "triggers": []}
    if t.dataset_updated:  # the lifecycle ingests the source that grew
        # the lifecycle starts from the dataset the ingest recorded (it ingests the source only if that has changed)
        lifecycle["triggers"].append(_trigger(name, DATASET_UPDATED, {"sets": ["data.source={{ event.payload.source }}"],
                                                                      "dataset": "{{ event.payload.dataset_digest }}"}))
    out = [lifecycle]
    if t.arrival:
        out.append({"flow": "ingest-arrived", "name": name, "entrypoint": ENTRYPOINTS["ingest-arrived"], "tags": tags,
                    "description": f"Ingest what voxelflow watch announced for {name}.",
                    "parameters": {"spec": ref, "spec_digest": digest}, "work_pool": pool, "concurrency_limit": None, "schedules": [],
                    "triggers": [_trigger(name, DATA_ARRIVED, {"source": "{{ event.payload.source }}"}, ROUTE_SOURCE)]})
    if t.unlabelled and t.unlabelled.predict:
        out.append({"flow": "predict", "name": name, "entrypoint": ENTRYPOINTS["predict"], "tags": tags,
                    "description": f"Segment {name}'s newly arrived unlabelled cases with the champion.",
                    "parameters": {"spec": ref, "spec_digest": digest}, "work_pool": pool, "concurrency_limit": enqueue, "schedules": [],
                    "triggers": [_trigger(name, CASES_UNLABELLED, {"cases": "{{ event.payload.cases }}"})]})
    if t.arrival or (t.unlabelled and t.unlabelled.predict):  # series voxelflow receive or a DICOMweb watch spooled
        out.append({"flow": "predict-arrived", "name": name, "entrypoint": ENTRYPOINTS["predict-arrived"],
                    "tags": tags, "description": f"Route {name}'s received DICOM series: labelled ones to "
                    "ingestion, the others to clinical inference and back to the PACS.",
                    "parameters": {"spec": ref, "spec_digest": digest}, "work_pool": pool,
                    "concurrency_limit": enqueue, "schedules": [],
                    "triggers": [_trigger(name, DATA_ARRIVED, {"source": "{{ event.payload.source }}"}, ROUTE_SPOOL)]})
    return out


def _current(client, d: dict[str, Any]) -> dict[str, Any] | None:
    """What the server holds for the planned deployment ``d``, in the plan's shape; None when absent."""
    from prefect.exceptions import ObjectNotFound

    try:
        dep = client.read_deployment_by_name(f"{d['flow']}/{d['name']}")
    except ObjectNotFound:
        return None
    limit = None
    if dep.global_concurrency_limit is not None:
        limit = {"limit": dep.global_concurrency_limit.limit,
                 "collision_strategy": dep.concurrency_options.collision_strategy.value if dep.concurrency_options
                 else "ENQUEUE"}
    triggers = []
    for a in client.read_resource_related_automations(f"prefect.deployment.{dep.id}"):
        trig, act = a.trigger, (a.actions[0] if a.actions else None)
        triggers.append({"type": "event", "enabled": a.enabled,
                         "match": {k: v for k, v in trig.match.model_dump().items()},
                         "expect": sorted(trig.expect), "parameters": getattr(act, "parameters", None) or {}})
    return {"id": dep.id, "flow": d["flow"], "name": dep.name, "entrypoint": dep.entrypoint, "tags": sorted(dep.tags),
            "description": dep.description, "parameters": dep.parameters, "work_pool": dep.work_pool_name,
            "concurrency_limit": limit, "triggers": triggers,
            "schedules": [{"cron": s.schedule.cron, "timezone": s.schedule.timezone, "active": s.active}
                          for s in dep.schedules]}


def _same(planned: dict[str, Any], current: dict[str, Any] | None) -> bool:
    if current is None:
        return False
    want = {**planned, "tags": sorted(planned["tags"])}
    return all(want[k] == current[k] for k in want if k not in ("id",))


def apply(spec_path: Path, pool: str | None = None) -> list[tuple[str, str]]:
    """Create or update the spec's deployments; [(flow/name, created|updated|unchanged)]."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy, ConcurrencyOptions
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.events import DeploymentTriggerTypes
    from prefect.exceptions import ObjectNotFound
    from pydantic import TypeAdapter

    from flows.deploy_steps import engine_command
    from voxelflow.spec.config import load_spec

    spec = load_spec(spec_path)
    planned, done = plan(spec, spec_ref(spec_path), pool), []
    with get_client(sync_client=True) as client:
        try:
            work_pool = client.read_work_pool(planned[0]["work_pool"])
        except ObjectNotFound:
            raise ValueError(f"work pool {planned[0]['work_pool']!r} does not exist: prefect work-pool create "
                             f"{planned[0]['work_pool']} --type process") from None
        if work_pool.type != "process":
            raise ValueError(f"work pool {work_pool.name!r} is of type {work_pool.type}: voxelflow up deploys to "
                             "process pools (Kubernetes pools: deployments/prefect.yaml)")
        for d in planned:
            current = _current(client, d)
            label = f"{d['flow']}/{d['name']}"
            if _same(d, current):
                done.append((label, "unchanged"))
                continue
            flow_id = client.create_flow_from_name(d["flow"])
            limit = d["concurrency_limit"]
            dep_id = client.create_deployment(
                flow_id, d["name"], parameters=d["parameters"], description=d["description"], tags=d["tags"],
                work_pool_name=d["work_pool"], work_queue_name="default", entrypoint=d["entrypoint"],
                pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}],
                job_variables={"command": engine_command()["command"]},
                concurrency_limit=limit["limit"] if limit else None,
                concurrency_options=ConcurrencyOptions(collision_strategy=ConcurrencyLimitStrategy(
                    limit["collision_strategy"])) if limit else None)
            for s in client.read_deployment_schedules(dep_id):
                client.delete_deployment_schedule(dep_id, s.id)
            if d["schedules"]:
                client.create_deployment_schedules(dep_id, [
                    (CronSchedule(cron=s["cron"], timezone=s["timezone"]), s["active"]) for s in d["schedules"]])
            client.delete_resource_owned_automations(f"prefect.deployment.{dep_id}")
            for i, trigger in enumerate(d["triggers"]):
                made = TypeAdapter(DeploymentTriggerTypes).validate_python({**trigger, "name": f"{label}-{i}"})
                made.set_deployment_id(dep_id)
                client.create_automation(made.as_automation())
            done.append((label, "created" if current is None else "updated"))
    return done


def remove(spec_path: Path) -> list[str]:
    """Delete every deployment ``voxelflow up`` makes for the spec's pipeline (and their triggers)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from voxelflow.spec.config import load_spec

    name, gone = load_spec(spec_path).name, []
    with get_client(sync_client=True) as client:
        for flow in ENTRYPOINTS:
            try:
                dep = client.read_deployment_by_name(f"{flow}/{name}")
            except ObjectNotFound:
                continue
            client.delete_resource_owned_automations(f"prefect.deployment.{dep.id}")
            client.delete_deployment(dep.id)
            gone.append(f"{flow}/{name}")
    return gone


def up(spec: Annotated[Path, typer.Argument(help="pipeline spec (YAML)")],
       pool: Annotated[Optional[str], typer.Option(help="work pool (default: the spec's work_pool, else "
                                                        "voxelflow-process)")] = None) -> None:
    """Create or update the Prefect deployments the spec's triggers need (its lifecycle, ingest on arrival,
    prediction on unlabelled arrivals); unchanged ones are left alone."""
    from flows.cli import console, reasons

    with reasons():
        for label, what in apply(spec, pool):
            console.print(f"{what:9} {label}", highlight=False)


def down(spec: Annotated[Path, typer.Argument(help="pipeline spec (YAML)")]) -> None:
    """Delete the Prefect deployments `voxelflow up` made for the spec's pipeline."""
    from flows.cli import console, reasons

    with reasons():
        gone = remove(spec)
        for label in gone:
            console.print(f"removed {label}", highlight=False)
        if not gone:
            console.print("no deployments of this pipeline", highlight=False)
