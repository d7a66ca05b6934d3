"""`prefect deploy` steps of deployments/prefect.yaml (they run in the process of `prefect deploy`)."""

from __future__ import annotations

import shlex
import sys

#: what the warm-start server imports of Prefect besides the library's list (about 1 s a flow run here): the engine's
#: modules and those the flows and tasks import. Never ``prefect.engine`` itself, which each run executes as __main__.
ENGINE_PRELOAD = ("prefect.main", "prefect.flow_engine", "prefect.task_engine", "prefect._internal.metrics",
                  "prefect._internal.control_listener", "prefect.cache_policies", "prefect.transactions",
                  "prefect.runtime", "prefect.input", "prefect.flow_runs", "prefect.deployments", "prefect.artifacts",
                  "prefect.blocks.system", "prefect.events.clients", "prefect.client.orchestration")


def engine_command() -> dict[str, str]:
    """The command that starts a process-pool flow run as one process: this environment's Python running
    Prefect's engine, which runs the pull step and the flow, through :mod:`voxelflow.core.warm`.

    Without a ``command``, Prefect 3.9's process worker first starts a supervisor process for the pull
    step and then the engine in a second Python process: about a second more per flow run. The path
    is this interpreter's, as the working directory is the one `prefect deploy` ran in, so the worker
    needs nothing on its PATH. ``voxelflow.core.warm`` runs ``python -m prefect.engine`` forked from a
    server that has torch, MONAI, MLflow, the library and Prefect (:data:`ENGINE_PRELOAD`) imported (the first run
    starts it and runs cold; ``VOXELFLOW_WARM_START=0`` in the worker's environment turns it off).
    """
    return {"command": f"{shlex.quote(sys.executable)} -m voxelflow.core.warm --preload {','.join(ENGINE_PRELOAD)} "
                       "prefect.engine"}
