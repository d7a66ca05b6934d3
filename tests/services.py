"""Real services on loopback for the tests: moto's S3 server, a fresh PostgreSQL database, a Dask cluster
of separate processes, Prefect workers. Each is a context manager that starts and stops its processes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx

from flows.server import free_port

BIN = Path(sys.executable).parent
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def wait_until(check, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if check():
                return
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} did not come up: {tail}")
        time.sleep(0.2)


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def moto_s3(workdir: Path, bucket: str = "voxelflow") -> Iterator[dict[str, str]]:
    """moto's S3 server on 127.0.0.1 with one bucket; yields the environment that points clients at it."""
    port = free_port()
    log = workdir / "moto.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=fh, stderr=subprocess.STDOUT, cwd=workdir)
    env = {**S3_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    try:
        wait_until(lambda: httpx.get(env["AWS_ENDPOINT_URL"], timeout=1).status_code < 500, 30, "moto", proc, log)
        httpx.put(f"{env['AWS_ENDPOINT_URL']}/{bucket}", timeout=10).raise_for_status()
        yield env
    finally:
        stop(proc)


@contextlib.contextmanager
def fresh_postgres(admin_url: str) -> Iterator[str]:
    """A new database on the server of ``admin_url``, dropped afterwards; yields its URL."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"voxelflow_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        from voxelflow.core import db as vdb

        for url in [u for u in vdb._open if name in u]:  # engines that connect() pooled for this database
            vdb._open.pop(url).dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextlib.contextmanager
def dask_cluster(workdir: Path, env: dict[str, str], n_workers: int = 2) -> Iterator[str]:
    """`dask scheduler` and ``n_workers`` `dask worker` processes on 127.0.0.1; yields the scheduler address."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = []
    logs = []
    try:
        log = workdir / "dask-scheduler.log"
        logs.append(log)
        with open(log, "w") as fh:
            procs.append(subprocess.Popen(
                [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                 "--dashboard-address", "127.0.0.1:0"], env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=workdir))
        for i in range(n_workers):
            log = workdir / f"dask-worker-{i}.log"
            logs.append(log)
            with open(log, "w") as fh:
                procs.append(subprocess.Popen(
                    [str(BIN / "dask"), "worker", address, "--host", "127.0.0.1", "--nthreads", "1",
                     "--nworkers", "1", "--dashboard-address", "127.0.0.1:0", "--preload", "voxelflow.data.dask_preload",
                     "--local-directory", str(workdir / f"dask-worker-{i}")],
                    env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=workdir))

        def ready() -> bool:
            from distributed import Client

            with Client(address, timeout=5) as client:
                return len(client.scheduler_info()["workers"]) >= n_workers

        wait_until(ready, 120, "dask cluster", procs[0], logs[0])
        yield address
    finally:
        for proc in reversed(procs):
            stop(proc)


@contextlib.contextmanager
def prefect_worker(pool: str, env: dict[str, str], log: Path, cwd: Path, warm: bool = False) -> Iterator[subprocess.Popen]:
    """`prefect worker start --pool POOL` (process type) for the life of the block; ``warm``: `voxelflow worker`, which
    starts its runs' warm-start server first and then is that worker."""
    command = ([str(BIN / "voxelflow"), "worker", "--pool", pool] if warm else
               [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"])
    with open(log, "w") as fh:
        proc = subprocess.Popen(command, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd)
    try:
        yield proc
    finally:
        stop(proc, timeout=30)


@contextlib.contextmanager
def scoped_environ(values: dict[str, str]) -> Iterator[None]:
    """Set variables in this process for the block, then restore them; S3 clients made meanwhile are
    forgotten at both ends (s3fs caches them per arguments, and the endpoint comes from the environment)."""
    import s3fs

    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        s3fs.S3FileSystem.clear_instance_cache()
