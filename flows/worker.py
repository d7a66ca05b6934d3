"""``voxelflow worker [--pool P] [OPTIONS of prefect worker start]``: Prefect's process worker, with the warm-start
server of its flow runs (:mod:`voxelflow.core.warm`) started first, so its first flow run is warm too.

Started by ``prefect worker start``, a worker's first flow run starts that server and runs cold beside its imports
(about 9 s of them on a 2-core machine, and the run's own start took 6.2 s instead of 2.8 there). This command
starts the server for the environment Prefect's process worker gives its runs, then becomes
``prefect worker start --type process`` (the same process: the server ends with it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from flows.up import DEFAULT_POOL


def run_environment(env: dict[str, str]) -> dict[str, str]:
    """The environment Prefect's process worker gives a flow run, but the run's own identity (``PREFECT__*``): its
    own, then its Prefect settings as variables (``BaseWorker._base_environment``)."""
    from prefect.settings import get_current_settings

    return {**env, **get_current_settings().to_environment_variables(exclude_unset=True)}


def worker(ctx: typer.Context,
           pool: Annotated[str, typer.Option("--pool", "-p", help="the process work pool to take runs from")] = DEFAULT_POOL,
           ) -> None:
    """Start a process worker whose flow runs start warm: `prefect worker start --type process --pool POOL` (other
    options are passed on), after the runs' warm-start server has begun its imports."""
    from flows.deploy_steps import ENGINE_PRELOAD
    from voxelflow.core import warm

    if any(arg == "--type" or arg.startswith("--type=") or arg == "-t" for arg in ctx.args):
        raise typer.BadParameter("voxelflow worker is a process worker (its runs are forked from a warm server); "
                                 "start other types with prefect worker start --type TYPE", param_hint="--type")
    try:
        key = warm.warm_up(run_environment(dict(os.environ)), ENGINE_PRELOAD)
    except (OSError, warm.WarmError) as exc:
        key = None
        print(f"voxelflow worker: no warm-start server ({exc}); flow runs start cold", file=sys.stderr)
    if key is not None:
        print(f"voxelflow worker: warm-start server {key} in {warm.folder()}", file=sys.stderr, flush=True)
    prefect = Path(sys.executable).with_name("prefect")
    command = [str(prefect)] if prefect.exists() else [sys.executable, "-m", "prefect"]
    sys.stdout.flush()
    os.execv(command[0], [*command, "worker", "start", "--type", "process", "--pool", pool, *ctx.args])
