"""Warm starts: ``python -m voxelflow.core.warm MODULE [ARG ...]`` runs ``python -m MODULE ARG ...`` in a process
forked from a server that has imported torch, MONAI, MLflow and the voxelflow library already.

A process-pool flow run is a fresh interpreter (``python -m prefect.engine``); before its first stage does any work
it imports about 6.5 s of modules on a 2-core machine (MONAI alone 4.9 s, torch included). The first run with
warm starts on (the default) starts a server in the background, detached, and runs the usual way; each later run
with the same interpreter, code and environment asks that server for a copy of itself (``fork``) that has them
all imported. The copy runs the module as ``python -m`` would:

- with the caller's standard input, output and error (its file descriptors, passed over the socket), its working
  directory, umask, arguments and environment (``os.environ`` replaced before the module is imported; nothing
  the server imported reads the ``VOXELFLOW_*`` variables or a run's ``PREFECT__*`` identity at import time; a
  preloaded Prefect's settings, read at import, come from the same ``PREFECT_*`` variables, the server being
  keyed by them, and are read again in the copy), and ``sys.path[0]`` the working directory;
- with fresh seeds for ``random``, numpy's global generator and torch's, as a fresh process would have;
- in a process group of its own, to which the caller forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and
  SIGUSR2 (a worker's cancellation reaches the run and its subprocesses); if the caller is killed outright, the
  server kills the group;
- its exit status, or the signal that ended it, is the caller's.

A server is keyed by a digest of the interpreter, the environment (all but ``VOXELFLOW_*`` and ``PREFECT__*``), the
modules it imports (:data:`PRELOAD` and the caller's ``--preload``, which the flows layer gives: Prefect's engine) and
the state of the code it would import (each preloaded package's files and the folders they are installed in): a
``pip install``, an edited voxelflow source file or another ``OMP_NUM_THREADS`` is another key, so another server;
a server ends with the last of the processes that started its callers or warmed it up (the workers), after
``--idle-seconds`` without a run (``VOXELFLOW_WARM_IDLE_S``, default a day), or at once when its socket is removed;
never while a run it forked goes on.
Only the same user may connect (the folder is 0700 and the server checks the peer's uid). Where a CUDA device may
be visible runs start cold: CUDA does not survive a fork once initialised. Where no server is up
yet, where it cannot be reached, or with ``VOXELFLOW_WARM_START=0``, the module runs in this process instead
(``exec``), exactly as ``python -m MODULE`` would. A run that is handed to a server is never run a second time.

The cost: the server's memory (about 0.7 GB resident with the modules below and Prefect's engine), shared
copy-on-write with its runs.
This module never imports Prefect by itself; it is the library's because it runs any module.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from voxelflow.core.private import private_folder

#: what a server imports before it forks: everything a lifecycle imports but Prefect and the flows
PRELOAD = ("numpy", "torch", "torch._dynamo", "torch.optim", "monai", "monai.transforms", "monai.networks.nets",
           "mlflow", "mlflow.store.tracking.sqlalchemy_store", "mlflow.pytorch", "xarray", "zarr", "sqlalchemy", "nibabel", "pydicom", "fsspec", "pydantic", "httpx",
           "voxelflow.pipeline", "voxelflow.data.preprocess", "voxelflow.learn.train", "voxelflow.learn.evaluate",
           "voxelflow.release.registry", "voxelflow.stages.deploy", "voxelflow.serving.serve", "uvicorn")
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
IDLE_S = 86400.0
WAIT_FOR_START_S = 120.0  # a server still importing: wait for it (the run would import the same), this long at most
_HEADER = struct.Struct("!I")


class WarmError(RuntimeError):
    """The server could not take the run (the caller runs it itself)."""


# ---------------------------------------------------------------- where and which


def folder() -> Path:
    """The servers' folder: ``VOXELFLOW_WARM_DIR``, else ``voxelflow-warm-<uid>`` in the temporary folder; 0700."""
    where = Path(os.environ.get("VOXELFLOW_WARM_DIR") or Path(tempfile.gettempdir()) / f"voxelflow-warm-{os.getuid()}")
    try:
        return private_folder(where)
    except PermissionError as exc:
        raise WarmError(str(exc)) from None


def _code_state(names: tuple[str, ...]) -> list[str]:
    """What would make a preloaded module another: voxelflow's sources (their digest), the entry file and install
    folder of the other packages (a ``pip install`` rewrites both)."""
    import importlib.util

    from voxelflow.core.user_code import source_digests

    state, seen = [], set()
    for name in names:
        top = name.split(".")[0]
        if top in seen:
            continue
        seen.add(top)
        try:
            found = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            found = None
        if found is None or not found.origin:
            state.append(f"{top}:absent")
            continue
        if top == "voxelflow":
            state.append(f"voxelflow:{source_digests(['voxelflow'])['voxelflow']}")
            continue
        origin = Path(found.origin)
        roots = list(found.submodule_search_locations or [])
        for path in [origin, *(Path(r).parent for r in roots)]:
            try:
                st = path.stat()
                state.append(f"{path}:{st.st_ino}:{st.st_mtime_ns}")
            except OSError:
                state.append(f"{path}:absent")
    return state


def kept_environment(env: dict[str, str]) -> dict[str, str]:
    """The variables a server is made with (and keyed by): all but ``VOXELFLOW_*``, which the library reads only
    when called, and ``PREFECT__*``, a run's identity (its flow run, worker and deployment), which Prefect's engine
    reads when it runs. Prefect's settings (``PREFECT_*``) are read when Prefect is imported: they are kept."""
    return {k: v for k, v in env.items() if not k.startswith(("PREFECT__", "VOXELFLOW_"))}


def key_of(env: dict[str, str], preload: tuple[str, ...] = PRELOAD) -> str:
    digest = hashlib.sha256()
    for part in [sys.executable, *sorted(f"{k}={v}" for k, v in kept_environment(env).items()), *preload,
                 *_code_state(preload)]:
        digest.update(part.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()[:20]


def module_names(given: str) -> tuple[str, ...]:
    """Comma-separated module names, each checked (a name is all a server is ever told to import)."""
    names = tuple(n.strip() for n in given.split(",") if n.strip())
    for name in names:
        if not all(part.isidentifier() for part in name.split(".")):
            raise WarmError(f"{name!r} is not a module name")
    return names


def preload_names(env: dict[str, str], extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """``VOXELFLOW_WARM_PRELOAD`` (comma-separated module names) or :data:`PRELOAD`, then the caller's ``extra``."""
    base = module_names(env.get("VOXELFLOW_WARM_PRELOAD", "")) or PRELOAD
    return base + tuple(n for n in extra if n not in base)


# ---------------------------------------------------------------- the wire: 4-byte length, JSON


def _send(conn: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    framed = _HEADER.pack(len(data)) + data
    if fds:
        socket.send_fds(conn, [framed], fds)
    else:
        conn.sendall(framed)


def _receive(conn: socket.socket, want_fds: int = 0) -> tuple[dict | None, list[int]]:
    """One message (None at end of stream) and the descriptors that came with its first bytes."""
    buf, fds = b"", []
    while len(buf) < _HEADER.size:
        if want_fds and not fds:
            chunk, got, _, _ = socket.recv_fds(conn, 65536, want_fds)
            fds.extend(got)
        else:
            chunk = conn.recv(65536)
        if not chunk:
            for fd in fds:
                os.close(fd)
            return None, []
        buf += chunk
    (size,) = _HEADER.unpack(buf[:_HEADER.size])
    if size > 16 << 20:
        raise WarmError(f"a message of {size} bytes")
    buf = buf[_HEADER.size:]
    while len(buf) < size:
        chunk = conn.recv(size - len(buf))
        if not chunk:
            return None, fds
        buf += chunk
    return json.loads(buf[:size]), fds


# ---------------------------------------------------------------- the caller


@contextlib.contextmanager
def socket_address(path: Path) -> Iterator[str]:
    """``path`` as a Unix socket's address: itself, or, where it is longer than an address may be (108 bytes), the
    same file through a descriptor of its folder (``/proc/self/fd/N/NAME``)."""
    if len(os.fsencode(str(path))) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _connect(path: Path) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(5)
        with socket_address(path) as address:
            conn.connect(address)
        conn.settimeout(None)
        return conn
    except OSError:
        conn.close()
        return None


def _holder_alive(lock: Path) -> bool:
    """Whether a server holds ``lock`` (it does for its whole life, from before its imports)."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def start_server(where: Path, key: str, env: dict[str, str], idle_s: float | None = None, owner: int | None = None,
                 extra: tuple[str, ...] = ()) -> None:
    """A server for ``key``, detached (its own session, nothing of the caller's open), its log ``<key>.log``; it
    ends with ``owner`` (default: the process that started this one) and the later callers' starters, or after
    ``idle_s`` without a run (default: ``VOXELFLOW_WARM_IDLE_S`` of ``env``, else :data:`IDLE_S`)."""
    import subprocess

    owner = os.getppid() if owner is None else owner
    idle_s = float(env.get("VOXELFLOW_WARM_IDLE_S") or IDLE_S) if idle_s is None else idle_s
    with open(where / f"{key}.log", "ab") as log:
        subprocess.Popen([sys.executable, "-m", "voxelflow.core.warm_server", key, "--idle-seconds", str(idle_s),
                          "--owner", str(owner), *(["--preload", ",".join(extra)] if extra else [])],
                         env={**kept_environment(env), **{k: v for k, v in env.items() if k.startswith("VOXELFLOW_WARM")}},
                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True,
                         cwd=str(where))


def warm_up(env: dict[str, str], extra: tuple[str, ...] = (), owner: int | None = None) -> str | None:
    """Start the server that runs with ``env`` and ``extra`` will use, unless one is up or starting: what a worker
    does before its first run, so that run is warm too. Its key; None where warm starts are off or a CUDA device may
    be visible. The server ends with ``owner`` (default: this process, which a worker then ``exec``s)."""
    if warm_starts_off(env) or cuda_may_be_visible(env):
        return None
    owner = os.getpid() if owner is None else owner
    key, conn, _ = _find_or_start(env, extra, owner)
    if conn is not None:  # up already (another worker's): this one is an owner too, so it lives as long as either
        with conn:
            conn.settimeout(5)
            _send(conn, {"owner": owner})
            _receive(conn)
    return key


def _find_or_start(env: dict[str, str], extra: tuple[str, ...], owner: int | None = None
                   ) -> tuple[str, socket.socket | None, bool]:
    """The key of the server for ``env`` and ``extra``, a connection to it if it is serving, and whether it is
    starting (held, not serving yet); one is started (for ``owner``) where none is."""
    where = folder()
    key = key_of(env, preload_names(env, extra))
    conn = _connect(where / f"{key}.sock")
    if conn is not None:
        return key, conn, False
    if _holder_alive(where / f"{key}.lock"):
        return key, None, True
    start_server(where, key, env, owner=owner, extra=extra)
    return key, None, False


def server_for(env: dict[str, str], extra: tuple[str, ...] = ()) -> socket.socket | None:
    """A connection to the server for this interpreter, code, ``env`` and modules (:func:`preload_names` with
    ``extra``); None where there is none to use now (one is started where none is)."""
    key, conn, starting = _find_or_start(env, extra)
    if conn is not None or not starting:
        return conn
    where = folder()
    path, lock = where / f"{key}.sock", where / f"{key}.lock"
    deadline = time.monotonic() + WAIT_FOR_START_S  # starting: it imports what this run would import
    while time.monotonic() < deadline and _holder_alive(lock):
        time.sleep(0.05)
        conn = _connect(path)
        if conn is not None:
            return conn
    return None


def _exit_as(status: dict) -> int:
    if status.get("signal"):
        sig = int(status["signal"])
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    return int(status.get("code", 1))


def through(conn: socket.socket, module: str, args: list[str]) -> int:
    """Hand ``python -m module args`` to the server on ``conn`` and be that run for whoever started this process."""
    umask = os.umask(0)
    os.umask(umask)
    _send(conn, {"module": module, "args": args, "cwd": os.getcwd(), "umask": umask, "env": dict(os.environ),
                 "owner": os.getppid()},
          fds=[0, 1, 2])
    started, _ = _receive(conn)
    if started is None or "pid" not in started:
        raise WarmError((started or {}).get("error", "the server ended before it started the run"))
    pid = int(started["pid"])

    def forward(sig, _frame):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass

    for sig in FORWARDED:
        signal.signal(sig, forward)
    ended, _ = _receive(conn)  # a forwarded signal interrupts the wait, which goes on (PEP 475)
    if ended is None:  # the server went away (killed) while the run goes on: wait for the run, its status unknown
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        print(f"voxelflow warm start: the server ended before run {pid} did; its exit status is unknown",
              file=sys.stderr)
        return 1
    return _exit_as(ended)


def cold(module: str, args: list[str]) -> None:
    """``python -m module args`` in place of this process."""
    os.execv(sys.executable, [sys.executable, "-m", module, *args])


def cuda_may_be_visible(env: dict[str, str]) -> bool:
    """Whether a run here could use a CUDA device: CUDA does not survive a fork once a preloaded module has touched
    it, so such runs start cold (they are long ones anyway)."""
    if env.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return any(Path(p).exists() for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg"))


def warm_starts_off(env: dict[str, str]) -> bool:
    return env.get("VOXELFLOW_WARM_START", "1").strip().lower() in ("0", "false", "no", "off")


def run(module: str, args: list[str], extra: tuple[str, ...] = ()) -> int:
    if warm_starts_off(dict(os.environ)) or cuda_may_be_visible(dict(os.environ)):
        cold(module, args)
    try:
        conn = server_for(dict(os.environ), extra)
    except (OSError, WarmError) as exc:
        print(f"voxelflow warm start: no server ({exc}); starting cold", file=sys.stderr)
        conn = None
    if conn is None:
        cold(module, args)
    try:
        return through(conn, module, args)
    except (OSError, WarmError) as exc:  # refused before any fork: nothing ran, so run it here
        print(f"voxelflow warm start: the server did not take the run ({exc}); starting cold", file=sys.stderr)
        conn.close()
        cold(module, args)
    return 1  # not reached: cold() replaces this process


def main(argv: list[str] | None = None) -> None:
    """``python -m voxelflow.core.warm [--preload M1,M2] MODULE [ARG ...]``: ``--preload`` names modules the server
    imports too (the caller's own; their import-time reads of the environment are why it keys by it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: tuple[str, ...] = ()
    if argv[:1] == ["--preload"] and len(argv) > 1:
        try:
            extra = module_names(argv[1])
        except WarmError as exc:
            raise SystemExit(f"voxelflow warm start: {exc}") from None
        argv = argv[2:]
    if not argv or argv[0].startswith("-"):
        raise SystemExit("usage: python -m voxelflow.core.warm [--preload MODULE,...] MODULE [ARG ...]")
    raise SystemExit(run(argv[0], argv[1:], extra))


if __name__ == "__main__":
    main()
