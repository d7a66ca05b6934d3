"""Two ingests of one source, and two lifecycles of one pipeline, at the same time on one database.

The invariants: no case is stored twice, every arrived object has exactly one ledger state, the
audit chain is unbroken, and each lifecycle records its own row and results. Runs on SQLite always
and on PostgreSQL when ``VOXELFLOW_TEST_DATABASE_URL`` names a server (each test makes and drops its
own database).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.services import fresh_postgres

BACKENDS = ["sqlite", "postgresql"]


@contextlib.contextmanager
def database(kind: str, tmp_path: Path):
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'shared.db'}"
        return
    admin = os.environ.get("VOXELFLOW_TEST_DATABASE_URL")
    if not admin:
        pytest.skip("VOXELFLOW_TEST_DATABASE_URL is not set: no PostgreSQL server to test against")
    with fresh_postgres(admin) as url:
        yield url


def _ingest(source: str, store: str, db_url: str, start, out) -> None:
    from voxelflow.core.db import connect
    from voxelflow.core.storage import Layout, Store
    from voxelflow.data.ingest import ingest
    from voxelflow.spec.config import DataSpec

    try:  # both open (and migrate) the new database at once, then ingest at once
        start.wait(60)
        db = connect(db_url)
        report = ingest(DataSpec(source=source), Layout(Store(store), "p"), db, source)
    except BaseException:  # the test fails with this process's own error, not a timeout
        import traceback

        out.put(traceback.format_exc())
        raise
    out.put((sorted(report.ingested), sorted(report.duplicate), report.objects, report.seen))


def _check_invariants(db_url: str, store: str, pipeline: str, n_objects: int) -> list[str]:
    from voxelflow.core import audit
    from voxelflow.core.db import Database
    from voxelflow.core.storage import Layout, Store
    from voxelflow.data.ingest import ingested_cases, read_ledger

    db = Database(db_url)
    rows = read_ledger(db, pipeline)
    keys = [(r["object"], r["sha256"]) for r in rows]
    assert len(keys) == len(set(keys)) == n_objects  # every object exactly once
    assert {r["state"] for r in rows} <= {"ingested", "duplicate", "quarantined"}
    cases = ingested_cases(db, pipeline)
    ingested_rows = [r for r in rows if r["state"] == "ingested"]
    assert len(ingested_rows) == 2 * len(cases)  # image + label, once per case
    assert Layout(Store(store), pipeline).raw.committed() == cases
    verdict = audit.verify(db)
    assert verdict.ok, verdict.problem
    db.dispose()
    return cases


@pytest.mark.parametrize("kind", BACKENDS)
def test_two_ingests_of_one_source_at_once(kind, tmp_path):
    from voxelflow.data.synthetic import make_decathlon

    source = make_decathlon(tmp_path / "incoming", n_cases=6, size=24)
    store = str(tmp_path / "store")
    with database(kind, tmp_path) as url:
        ctx = mp.get_context("spawn")
        start, out = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_ingest, args=(str(source), store, url, start, out)) for _ in range(2)]
        for p in procs:
            p.start()
        start.set()
        results = [out.get(timeout=240) for _ in procs]
        failed = [r for r in results if isinstance(r, str)]
        assert not failed, failed[0]
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
        ingested = [c for r in results for c in r[0]]
        assert len(ingested) == len(set(ingested)) == 6  # each case stored by exactly one of them
        assert sum(sum(r[2].values()) + r[3] for r in results) == 2 * 12  # each saw all 12 objects once
        assert len(_check_invariants(url, store, "p", 12)) == 6


LIFECYCLE = """
import json, sys
from voxelflow import pipeline
from voxelflow.spec.config import Settings, validate_spec

if __name__ == "__main__":  # the local Dask cluster's workers re-import this module
    spec = validate_spec(json.loads(sys.argv[1]))
    # fresh: each computes every step, so the two race all the way to registering (with reuse, one that
    # reached training after the other recorded its own would take that training and register nothing)
    result = pipeline.run(spec, Settings(), fresh=True)
    print(json.dumps([result.promotion["version"], result.promotion["promoted"], result.ingest, result.run_id,
                      result.reused]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", BACKENDS)
def test_two_lifecycles_of_one_pipeline_at_once(kind, tmp_path):
    import yaml

    from tests.conftest import REPO
    from voxelflow.data.synthetic import make_decathlon

    demo_data = yaml.safe_load((REPO / "deployments" / "specs" / "demo.yaml").read_text())

    source = make_decathlon(tmp_path / "incoming", n_cases=6, size=24)
    demo_data["data"]["source"] = str(source)
    demo_data["train"]["epochs"] = 2
    demo_data["evaluate"].update(test_fraction=0.26, val_fraction=0.3)  # these 6 cases: 1 test, 2 val, 3 train
    demo_data["promote"]["gates"] = {"min_dice": 0.0, "beat_champion_by": -1.0}
    demo_data["preprocess"]["cluster"] = "local"
    store = str(tmp_path / "store")
    with database(kind, tmp_path) as url:
        env = {"VOXELFLOW_HOME": str(tmp_path / "home"), "VOXELFLOW_STORE": store, "VOXELFLOW_DATABASE_URL": url,
               "VOXELFLOW_MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "VOXELFLOW_DASK_WORKERS": "1"}
        script = tmp_path / "lifecycle.py"
        script.write_text(LIFECYCLE)
        procs = [subprocess.Popen([sys.executable, str(script), json.dumps(demo_data)], env={**os.environ, **env},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outputs = [p.communicate(timeout=400) for p in procs]
        for p, (_, stderr) in zip(procs, outputs):
            assert p.returncode == 0, stderr[-3000:]
        results = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]
        assert sorted(r[0] for r in results) == ["1", "2"]  # one model version each
        assert sum(r[2]["ingested"] for r in results) == 6  # each case ingested once, by one of them
        assert [r[4] for r in results] == [[], []] and results[0][3] != results[1][3]  # each trained, in its run
        _check_invariants(url, store, "demo-spheres", 12)
        _check_recorded(url, "demo-spheres", {r[3] for r in results})


def _check_recorded(db_url: str, pipeline: str, run_ids: set[str]) -> None:
    """Each lifecycle's row says it finished, in its own MLflow run; each recorded its training (fresh records)."""
    from sqlalchemy import select

    from voxelflow.core import db as vdb
    from voxelflow.core.db import Database

    db = Database(db_url)
    with db.transaction() as conn:
        rows = conn.execute(select(vdb.lifecycles).where(vdb.lifecycles.c.pipeline == pipeline)).mappings().all()
        t = vdb.step_results
        trained = conn.execute(select(t.c.run_id).where(t.c.pipeline == pipeline, t.c.step == "train")).scalars().all()
    db.dispose()
    assert sorted(r["status"] for r in rows) == ["finished", "finished"]
    assert {r["run_id"] for r in rows} == run_ids and sorted(trained) == sorted(run_ids)
