"""The arrival deployments of deployments/prefect.yaml made for a test's own pipeline on the session's server.

Each is the shipped deployment with the test's spec as its ``spec`` parameter and its triggers matching the
test's pipeline instead of demo-spheres, on no work pool: the server's automation creates the runs, and the
test reads them (or executes one, as a worker would). Everything made is deleted afterwards, runs included,
so no later worker on the session's server picks them up.
"""

from __future__ import annotations

import contextlib
import copy
import uuid
from collections.abc import Iterator
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SHIPPED_PIPELINE = "demo-spheres"  # the pipeline of the spec the shipped arrival deployments carry


def shipped(flow_name: str, name: str) -> dict:
    """The deployment ``name`` of the flow entrypoint ending in ``:flow_name`` in deployments/prefect.yaml."""
    (d,) = [d for d in yaml.safe_load((REPO / "deployments/prefect.yaml").read_text())["deployments"]
            if d["name"] == name and d["entrypoint"].endswith(f":{flow_name}")]
    return d


@contextlib.contextmanager
def trigger_deployment(flow, name: str, pipeline: str, spec: str | Path) -> Iterator[uuid.UUID]:
    """The shipped deployment ``name`` of ``flow`` (a @flow) for ``spec`` of ``pipeline``: its id."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.events import DeploymentTriggerTypes
    from pydantic import TypeAdapter

    from voxelflow.data.watch import resource_id

    d = shipped(flow.fn.__name__, name)
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(flow)
        deployment_id = client.create_deployment(flow_id, f"{name}-{uuid.uuid4().hex[:6]}", entrypoint=d["entrypoint"],
                                                 parameters={**d["parameters"], "spec": str(spec)})
        try:
            for i, trigger in enumerate(d["triggers"]):
                assert trigger["match"]["prefect.resource.id"] == resource_id(SHIPPED_PIPELINE), trigger["match"]
                ours = {**copy.deepcopy(trigger), "match": {**trigger["match"],
                                                            "prefect.resource.id": resource_id(pipeline)},
                        "name": f"test-trigger-{i}"}
                made = TypeAdapter(DeploymentTriggerTypes).validate_python(ours)
                made.set_deployment_id(deployment_id)
                client.create_automation(made.as_automation())
            yield deployment_id
        finally:
            client.delete_resource_owned_automations(f"prefect.deployment.{deployment_id}")
            for run in client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(
                    any_=[deployment_id]))):
                client.delete_flow_run(run.id)
            client.delete_deployment(deployment_id)
