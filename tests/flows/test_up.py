"""`voxelflow up` / `down` against the session's real Prefect server: one deployment per flow, with the spec's
schedule, triggers and the lifecycle's limit; a second `up` changes nothing, an edit updates, `down` removes."""

from __future__ import annotations

import time
import uuid

import pytest
import yaml

from tests.conftest import BIN, REPO

TRIGGERS = {"schedule": {"cron": "0 3 * * 1", "timezone": "UTC", "active": False},
            "arrival": {"settle_s": 30}, "dataset_updated": {"min_new_cases": 5}, "unlabelled": {"predict": True}}


@pytest.fixture
def spec_path(prefect_here, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(__import__("prefect.client.schemas.actions", fromlist=["WorkPoolCreate"])
                                    .WorkPoolCreate(name="voxelflow-process", type="process"))
        except ObjectAlreadyExists:
            pass
    spec = yaml.safe_load((REPO / "deployments/specs/demo.yaml").read_text())
    spec["name"] = f"up-{uuid.uuid4().hex[:8]}"
    spec["triggers"] = TRIGGERS
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_up_twice_makes_one_deployment_per_flow_then_an_edit_updates_and_down_removes(spec_path):
    from prefect.client.orchestration import get_client

    from flows.up import apply, remove, verify
    from voxelflow.spec.config import load_spec

    name = yaml.safe_load(spec_path.read_text())["name"]
    labels = [f"lifecycle/{name}", f"ingest-arrived/{name}", f"predict/{name}", f"predict-arrived/{name}"]
    assert apply(spec_path) == [(label, "created") for label in labels]
    assert apply(spec_path) == [(label, "unchanged") for label in labels]
    with get_client(sync_client=True) as client:
        life = client.read_deployment_by_name(labels[0])
        assert life.global_concurrency_limit.limit == 1
        assert life.concurrency_options.collision_strategy.value == "ENQUEUE"
        assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in life.schedules] == [("0 3 * * 1", "UTC",
                                                                                                False)]
        (auto,) = client.read_resource_related_automations(f"prefect.deployment.{life.id}")
        assert auto.trigger.expect == {"voxelflow.dataset.updated"}
        assert auto.trigger.match.model_dump() == {"prefect.resource.id": f"voxelflow.dataset.{name}"}
        ingest = client.read_deployment_by_name(labels[1])
        (auto,) = client.read_resource_related_automations(f"prefect.deployment.{ingest.id}")
        assert auto.trigger.expect == {"voxelflow.data.arrived"}
        assert auto.trigger.match.model_dump() == {"prefect.resource.id": f"voxelflow.dataset.{name}",
                                                   "voxelflow.route": "source"}
        assert auto.actions[0].parameters["source"] == "{{ event.payload.source }}"

        assert life.parameters["spec_digest"] == load_spec(spec_path).digest()
        assert ingest.parameters["spec_digest"] == life.parameters["spec_digest"]
        recorded = life.parameters["spec_digest"]
    verify(str(spec_path), recorded)  # the spec as deployed runs

    spec = yaml.safe_load(spec_path.read_text())
    spec["train"]["epochs"] = spec["train"].get("epochs", 1) + 1  # an edit not deployed yet: refused by name
    spec_path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match=r"changed since `voxelflow up`.*run `voxelflow up .*` again"):
        verify(str(spec_path), recorded)
    spec["triggers"]["schedule"]["active"] = True
    del spec["triggers"]["unlabelled"]
    spec_path.write_text(yaml.safe_dump(spec))
    assert apply(spec_path) == [(labels[0], "updated"), (labels[1], "updated"),
                                (labels[3], "updated")]  # each runs the edited spec
    with get_client(sync_client=True) as client:
        assert [s.active for s in client.read_deployment_by_name(labels[0]).schedules] == [True]
    assert sorted(remove(spec_path)) == sorted(labels)  # predict/NAME, no longer planned, goes too
    assert remove(spec_path) == []


def test_watch_takes_its_source_and_settle_time_from_the_spec(tmp_path):
    """`voxelflow watch --spec SPEC` without a source watches triggers.arrival.source, settling as it says."""
    import subprocess

    incoming = tmp_path / "incoming"
    incoming.mkdir()
    spec = yaml.safe_load((REPO / "deployments/specs/demo.yaml").read_text())
    spec["triggers"] = {"arrival": {"source": str(incoming), "settle_s": 7}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = subprocess.Popen([str(BIN / "voxelflow"), "watch", "--spec", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**__import__("os").environ, "COLUMNS": "500",
                                                                       "VOXELFLOW_HOME": str(tmp_path / "home")})
    try:
        line = proc.stdout.readline()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert f"watching {incoming} for demo-spheres (settle 7 s)" in line


class Hold:
    """A webhook on loopback that keeps each POST waiting until :meth:`release` (then refuses it with 400,
    so the gate step that sent it fails and its lifecycle ends there)."""

    def __init__(self) -> None:
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.arrived: list[str] = []  # the pipeline of each request, in order
        self.gates: dict[int, threading.Event] = {}
        hold = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                gate = hold.gates.setdefault(len(hold.arrived), threading.Event())
                hold.arrived.append(body["pipeline"])
                gate.wait(120)
                self.send_response(400)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"

    def release(self, index: int) -> None:
        import threading

        self.gates.setdefault(index, threading.Event()).set()

    def close(self) -> None:
        for i in range(len(self.arrived) + 3):
            self.release(i)
        self.server.shutdown()
        self.server.server_close()


def wait_until(predicate, timeout: float, what: str, log=None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}\n{log() if log else ''}")
        time.sleep(0.3)


@pytest.mark.slow
def test_two_starts_of_one_pipeline_queue_while_another_pipeline_runs_beside_them(prefect_here, prefect_env, tmp_path):
    """`voxelflow up` for two pipelines; lifecycles of the first started twice and of the second once: the
    second start of the first waits for its first to end, the second pipeline runs meanwhile."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from flows.up import apply
    from tests.services import prefect_worker
    from voxelflow.data import synthetic

    synthetic.make_decathlon(tmp_path / "data", n_cases=4, size=24)
    names = [f"queue-{uuid.uuid4().hex[:6]}", f"beside-{uuid.uuid4().hex[:6]}"]
    for name in names:  # each lifecycle holds in a gate step right after its ingest, until the test lets it go
        spec = yaml.safe_load((REPO / "deployments/specs/demo.yaml").read_text())
        spec.update(name=name, triggers={"schedule": {"cron": "0 3 * * 1", "active": False}})
        spec["data"]["source"] = str(tmp_path / "data")
        spec["steps"] = [{"id": "hold", "uses": "voxelflow.steps:notify_webhook", "after": "ingest", "gate": True,
                          "retries": 0, "with": {"timeout_s": 150}}]
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(spec))
        with get_client(sync_client=True) as client:
            try:
                client.create_work_pool(__import__("prefect.client.schemas.actions", fromlist=["WorkPoolCreate"])
                                        .WorkPoolCreate(name="voxelflow-process", type="process"))
            except Exception:  # made by another test of this session
                pass
        assert apply(tmp_path / f"{name}.yaml") == [(f"lifecycle/{name}", "created")]

    hold = Hold()
    env = {**prefect_env, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5",
           "VOXELFLOW_WEBHOOK_URL": hold.url}
    log = tmp_path / "worker.log"

    def state(run) -> str:
        with get_client(sync_client=True) as client:
            return client.read_flow_run(run.id).state

    try:
        with prefect_worker("voxelflow-process", env, log, REPO):
            first = run_deployment(f"lifecycle/{names[0]}", timeout=0)
            wait_until(lambda: hold.arrived == [names[0]], 240, "the first lifecycle reached its gate", log.read_text)
            second = run_deployment(f"lifecycle/{names[0]}", timeout=0)
            beside = run_deployment(f"lifecycle/{names[1]}", timeout=0)
            wait_until(lambda: hold.arrived == [names[0], names[1]], 240,
                       "the other pipeline's lifecycle ran while the first was held", log.read_text)
            assert not state(second).is_running()  # still queued behind the first of its pipeline
            assert state(first).is_running() and state(beside).is_running()
            hold.release(0)
            wait_until(lambda: len(hold.arrived) == 3, 240, "the queued lifecycle started once the first ended",
                       log.read_text)
            assert hold.arrived[2] == names[0]
            hold.release(1)
            hold.release(2)
            wait_until(lambda: all(state(r).is_final() for r in (first, second, beside)), 120, "all three ended",
                       log.read_text)
    finally:
        hold.close()
    with get_client(sync_client=True) as client:
        one, two = client.read_flow_run(first.id), client.read_flow_run(second.id)
    assert all(state(r).is_failed() for r in (first, second, beside))  # each stopped at its gate, as held
    assert two.start_time >= one.end_time, (one.end_time, two.start_time)
