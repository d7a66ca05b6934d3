"""Warm starts (voxelflow.core.warm): the first run starts a server and runs cold; later runs are forked from it,
with the caller's descriptors, directory, arguments, environment and fresh seeds; signals reach the run, the
run's status is the caller's, a killed caller takes its run with it; another environment or code is another
server; a server ends when idle or when its socket goes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from voxelflow.core import warm

PROBE = textwrap.dedent("""
    import json, os, random, signal, subprocess, sys, time
    started = set(sys.modules)
    line = sys.stdin.readline().strip()
    report = {"argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0], "pid": os.getpid(), "ppid": os.getppid(),
              "pgid": os.getpgid(0), "stdin": line, "mine": os.environ.get("PREFECT__PROBE_MINE"), "torch": "torch" in started,
              "umask": os.umask(0o022)}
    if "--seeds" in sys.argv:
        import numpy, torch
        report["seeds"] = [random.random(), float(numpy.random.rand()), float(torch.rand(1))]
    if "--work" in sys.argv:  # the preloaded libraries in a forked copy: threads, an optimizer, a MONAI transform
        import numpy, torch
        from monai.transforms import Spacing
        net = torch.nn.Conv3d(2, 4, 3)
        out = net(torch.randn(1, 2, 40, 40, 40))
        torch.optim.Adam(net.parameters()).step()
        resampled = Spacing(pixdim=(2.0, 2.0, 2.0))(torch.rand(1, 32, 32, 32))
        report["work"] = [list(out.shape), list(resampled.shape), torch.get_num_threads()]
    if "--prefect" in sys.argv:  # a preloaded Prefect: its settings are this run's
        report["prefect"] = "prefect.flow_engine" in started
        from prefect.settings import get_current_settings
        report["api_url"] = str(get_current_settings().api.url)
        report["flow_run"] = os.environ.get("PREFECT__FLOW_RUN_ID")
    print(json.dumps(report), flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    if "--group" in sys.argv:  # a subprocess in the run's group, as a Dask worker would be
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(json.dumps({"grandchild": child.pid}), flush=True)
    if "--sleep" in sys.argv:
        time.sleep(60)
    sys.exit(int(os.environ.get("VOXELFLOW_PROBE_EXIT", "0")))
""")


@pytest.fixture
def place(tmp_path, monkeypatch):
    """A probe module, a folder for the servers (removed at the end: its servers then end) and the environment."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "probe.py").write_text(PROBE)
    where = tmp_path / "warm"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VOXELFLOW_WARM"))}
    env.update({"PYTHONPATH": str(code), "VOXELFLOW_WARM_DIR": str(where), "VOXELFLOW_WARM_PRELOAD": "numpy,torch",
                "VOXELFLOW_WARM_IDLE_S": "120"})
    work = tmp_path / "work"
    work.mkdir()
    yield env, work, where
    for log in where.parent.rglob("*.log"):  # the servers of every warm folder the test made
        for line in log.read_text().splitlines():
            if line.startswith("{"):
                pid = json.loads(line).get("pid")
                try:
                    os.kill(pid, signal.SIGTERM)
                except (ProcessLookupError, TypeError):
                    pass


def start(env, work, *args, stdin="hello\n", wait=True, preload=None, **extra):
    given = ["--preload", preload] if preload else []
    proc = subprocess.Popen([sys.executable, "-m", "voxelflow.core.warm", *given, "probe", *args], env={**env, **extra},
                            cwd=work, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdin.write(stdin)
    proc.stdin.close()
    proc.stdin = None  # sent: communicate() reads the rest
    if not wait:
        return proc
    out, err = proc.communicate(timeout=120)
    return proc, out, err


def report(out: str) -> dict:
    return json.loads(out.splitlines()[0])


def server_pid(where: Path) -> int:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        for log in where.glob("*.log"):
            for line in log.read_text().splitlines():
                if '"warm.serving"' in line:
                    return json.loads(line)["pid"]
        time.sleep(0.1)
    raise AssertionError(f"no server is serving: {[p.read_text() for p in where.glob('*.log')]}")


def test_the_first_run_is_cold_and_later_runs_are_forked_from_the_server_it_started(place):
    env, work, where = place
    proc, out, err = start(env, work, "a", "b c")
    cold = report(out)
    assert proc.returncode == 0 and "to stderr" in err
    assert cold["pid"] == proc.pid and cold["torch"] is False  # exec'd in place: python -m probe itself
    server = server_pid(where)
    assert oct(where.stat().st_mode & 0o777) == "0o700"

    proc, out, err = start(env, work, "a", "b c", stdin="over the socket\n", PREFECT__PROBE_MINE="yes",
                           VOXELFLOW_PROBE_EXIT="3")  # variables a server is not keyed by: each run's own
    warm_run = report(out)
    assert proc.returncode == 3, err  # the run's status is the caller's
    assert warm_run["ppid"] == server and warm_run["pid"] != proc.pid and warm_run["torch"] is True
    assert warm_run["pgid"] == warm_run["pid"]  # a group of its own, which the caller signals
    assert warm_run["argv"][1:] == ["a", "b c"] and warm_run["argv"][0].endswith("probe.py")
    assert warm_run["cwd"] == str(work) and warm_run["path0"] == str(work)
    assert warm_run["stdin"] == "over the socket" and warm_run["mine"] == "yes" and "to stderr" in err
    assert warm_run["umask"] == cold["umask"]


def test_each_forked_run_has_fresh_seeds(place):
    env, work, where = place
    start(env, work)
    server_pid(where)
    seeds = [report(start(env, work, "--seeds")[1])["seeds"] for _ in range(2)]
    assert all(a != b for a, b in zip(*seeds))


def test_a_signal_to_the_caller_reaches_the_run_and_its_group(place):
    env, work, where = place
    start(env, work)
    server_pid(where)
    proc = start(env, work, "--group", "--sleep", wait=False)
    run = json.loads(proc.stdout.readline())
    grandchild = json.loads(proc.stdout.readline())["grandchild"]
    assert run["torch"] is True
    proc.send_signal(signal.SIGTERM)  # what a worker's cancellation sends
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGTERM  # the run died of it, so the caller does
    assert ended(grandchild, within=10)


def test_a_caller_killed_outright_takes_its_run_with_it(place):
    env, work, where = place
    start(env, work)
    server_pid(where)
    proc = start(env, work, "--sleep", wait=False)
    run = json.loads(proc.stdout.readline())
    assert run["torch"] is True and alive(run["pid"])
    proc.kill()
    proc.wait(timeout=10)
    assert ended(run["pid"], within=10)


def test_another_environment_is_another_server_and_warm_starts_can_be_off(place):
    env, work, where = place
    start(env, work)
    server_pid(where)
    assert report(start(env, work)[1])["torch"] is True
    other = {"OMP_NUM_THREADS": str(int(env.get("OMP_NUM_THREADS") or 1) + 1)}
    assert report(start(env, work, **other)[1])["torch"] is False  # its own server, starting
    assert report(start(env, work, VOXELFLOW_WARM_START="0")[1])["torch"] is False
    assert len(list(where.glob("*.lock"))) == 2  # off: none started for it


def test_changed_code_is_another_key(tmp_path):
    pkg = tmp_path / "probe_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("A = 1\n")
    sys.path.insert(0, str(tmp_path))
    try:
        env = {"PATH": "/usr/bin"}
        before = warm.key_of(env, ("probe_pkg",))
        assert warm.key_of({**env, "PREFECT__FLOW_RUN_ID": "x", "VOXELFLOW_HOME": "y"}, ("probe_pkg",)) == before
        assert warm.key_of({**env, "PREFECT_API_URL": "x"}, ("probe_pkg",)) != before  # read when Prefect is imported
        assert warm.key_of(env, ("probe_pkg", "json")) != before  # another preload
        assert warm.key_of({**env, "OMP_NUM_THREADS": "3"}, ("probe_pkg",)) != before
        time.sleep(0.01)
        (pkg / "__init__.py").write_text("A = 2\n")
        assert warm.key_of(env, ("probe_pkg",)) != before
    finally:
        sys.path.remove(str(tmp_path))


def test_a_server_ends_when_its_socket_goes_or_when_idle(place):
    env, work, where = place
    start(env, work, VOXELFLOW_WARM_IDLE_S="1")
    server = server_pid(where)
    assert ended(server, within=20)  # idle for a second
    for log in where.glob("*.log"):
        log.unlink()
    start(env, work)
    server = server_pid(where)
    for sock in where.glob("*.sock"):
        sock.unlink()
    assert ended(server, within=20)
    assert report(start(env, work)[1])["torch"] is False  # gone: the next run is cold (and starts another)


def test_a_folder_others_can_enter_is_refused(tmp_path, monkeypatch):
    where = tmp_path / "open"
    where.mkdir(mode=0o755)
    os.chmod(where, 0o755)
    monkeypatch.setenv("VOXELFLOW_WARM_DIR", str(where))
    with pytest.raises(warm.WarmError, match="only this user"):
        warm.folder()


def test_the_shipped_preload_works_in_a_forked_run(place):
    """torch (its threads, an optimizer that imports torch._dynamo) and MONAI, imported before the fork."""
    env, work, where = place
    env = {**env, "VOXELFLOW_WARM_PRELOAD": ",".join(warm.PRELOAD)}
    start(env, work)
    server_pid(where)
    proc, out, err = start(env, work, "--work")
    run = report(out)
    assert proc.returncode == 0, err
    assert run["torch"] is True and run["work"][:2] == [[1, 4, 38, 38, 38], [1, 16, 16, 16]]
    assert run["work"][2] == int(subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                                                capture_output=True, text=True, env=env).stdout)
    logged = [json.loads(line) for log in where.glob("*.log") for line in log.read_text().splitlines()
              if line.startswith("{")]
    assert all(entry["missing"] == [] for entry in logged)


def ended(pid: int, within: float) -> bool:
    """Whether ``pid`` is gone within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and alive(pid):
        time.sleep(0.1)
    return not alive(pid)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of this process's is not alive
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_a_server_ends_with_the_worker_whose_runs_started_it(place):
    env, work, where = place
    # the process that starts the caller (a worker; here a shell) ends: so does the server the caller started
    done = subprocess.run(["sh", "-c", f"{sys.executable} -m voxelflow.core.warm probe </dev/null; true"], env=env,
                          cwd=work, capture_output=True, text=True, timeout=120)
    assert report(done.stdout)["torch"] is False
    server = server_pid(where)
    assert ended(server, within=20)


def test_a_folder_deeper_than_a_socket_address_may_be(place):
    env, work, where = place
    deep = where.parent / ("d" * 60) / ("e" * 60)
    env = {**env, "VOXELFLOW_WARM_DIR": str(deep)}
    start(env, work)
    server_pid(deep)
    assert len(str(next(deep.glob("*.sock")))) > 108
    assert report(start(env, work)[1])["torch"] is True


def test_a_callers_preload_is_imported_by_its_server_with_each_runs_settings(place):
    """The flows layer's --preload (Prefect's engine): imported before the fork, with settings from the variables the
    server is keyed by, and each run's identity (PREFECT__*) its own."""
    env, work, where = place
    env = {**env, "PREFECT_API_URL": "http://127.0.0.1:9/api", "PREFECT_HOME": str(work / "prefect-home")}
    first = report(start(env, work, "--prefect", preload="prefect.main,prefect.flow_engine",
                         PREFECT__FLOW_RUN_ID="run-1")[1])
    assert first["prefect"] is False and first["flow_run"] == "run-1"  # cold, while its server starts
    server_pid(where)
    forked = report(start(env, work, "--prefect", preload="prefect.main,prefect.flow_engine",
                          PREFECT__FLOW_RUN_ID="run-2")[1])
    assert forked["prefect"] is True and forked["ppid"] != os.getpid()
    assert forked["api_url"] == "http://127.0.0.1:9/api" and forked["flow_run"] == "run-2"
    other = report(start(env, work, "--prefect", preload="prefect.main,prefect.flow_engine",
                         PREFECT_API_URL="http://127.0.0.1:10/api")[1])
    assert other["prefect"] is False and other["api_url"] == "http://127.0.0.1:10/api"  # another key: cold
    assert report(start(env, work, "--prefect")[1])["prefect"] is False  # no preload given: the library's list only


def test_a_preload_that_is_not_a_module_name_is_refused(place):
    env, work, where = place
    proc, out, err = start(env, work, preload="os;import shutil")
    assert proc.returncode != 0 and "is not a module name" in err and not list(where.glob("*.lock"))


def test_a_preloaded_submodule_runs_as_main_without_runpys_warning(tmp_path):
    """prefect.flow_engine imports prefect.engine, which each run executes as __main__: as a cold start does, with no
    RuntimeWarning that the module was imported before."""
    code = tmp_path / "code" / "pkgx"
    code.mkdir(parents=True)
    (code / "__init__.py").write_text("")
    (code / "mod.py").write_text("import sys\nprint(__name__, 'pkgx.mod' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VOXELFLOW_WARM"))}
    env.update({"PYTHONPATH": str(code.parent), "VOXELFLOW_WARM_DIR": str(tmp_path / "warm"),
                "VOXELFLOW_WARM_PRELOAD": "json", "VOXELFLOW_WARM_IDLE_S": "60", "PYTHONWARNINGS": "default"})
    command = [sys.executable, "-m", "voxelflow.core.warm", "--preload", "pkgx.mod", "pkgx.mod"]
    cold = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert cold.stdout.split() == ["__main__", "False"], cold.stderr
    server = server_pid(tmp_path / "warm")
    try:
        forked = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert forked.stdout.split() == ["__main__", "True"] and "RuntimeWarning" not in forked.stderr, forked.stderr
    finally:
        os.kill(server, signal.SIGTERM)


def test_a_second_worker_warming_up_the_same_server_is_an_owner_too(place, monkeypatch):
    """Two workers with one environment share one server: it lives while either does, and ends with the last."""
    env, work, where = place
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(warm, "cuda_may_be_visible", lambda env: False)
    first, second = (subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]) for _ in range(2))
    try:
        key = warm.warm_up(dict(os.environ), owner=first.pid)
        server = server_pid(where)
        assert warm.warm_up(dict(os.environ), owner=second.pid) == key  # up already: registered, none started
        assert len(list(where.glob("*.lock"))) == 1
        first.kill()
        first.wait()
        assert not ended(server, within=6)  # the second worker still lives
        second.kill()
        second.wait()
        assert ended(server, within=20)
    finally:
        for proc in (first, second):
            proc.kill()
