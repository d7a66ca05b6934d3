"""The warm-start server of :mod:`voxelflow.core.warm`: it imports the preloaded modules once, then forks a copy of
itself for each caller, which becomes that caller's ``python -m MODULE`` process (:class:`_Job`)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import selectors
import signal
import socket
import struct
import sys
import time

from voxelflow.core.warm import (
    FORWARDED,
    IDLE_S,
    WarmError,
    _receive,
    _send,
    cuda_may_be_visible,
    folder,
    module_names,
    preload_names,
    socket_address,
)


class _Job:
    """What a forked copy runs: the request it was forked for."""

    def __init__(self, request: dict, fds: list[int]) -> None:
        self.request, self.fds = request, fds

    def become(self) -> None:
        """Turn this copy of the server into the caller's ``python -m`` process, then run the module."""
        import random
        import runpy

        req = self.request
        for sig in (signal.SIGCHLD, *FORWARDED):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as Python starts
        signal.set_wakeup_fd(-1)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)  # blocked since the fork: delivered now, as a run's
        for target, fd in zip((0, 1, 2), self.fds):
            os.dup2(fd, target)
            if fd > 2:
                os.close(fd)
        os.chdir(req["cwd"])
        os.umask(int(req["umask"]))
        os.environ.clear()
        os.environ.update(req["env"])
        sys.path[0] = os.getcwd()
        sys.argv = [req["module"], *req["args"]]
        if "prefect.context" in sys.modules:  # preloaded by the caller's --preload: its settings as this run's env has
            sys.modules["prefect.context"].refresh_global_settings_context()  # them (profiles file, argv included)
        try:  # as Python sets it up: stdout line-buffered on a terminal only (stderr always is)
            sys.stdout.reconfigure(line_buffering=sys.stdout.isatty())
        except (AttributeError, ValueError, OSError):
            pass
        random.seed()
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()
        if "torch" in sys.modules:
            sys.modules["torch"].seed()
        if req["module"] in sys.modules:  # imported by a preloaded one (prefect.flow_engine imports prefect.engine), as
            import warnings  # in a cold start, where the module imports itself again: runpy's warning says only that

            warnings.filterwarnings("ignore", message=f"'{req['module']}' found in sys.modules", category=RuntimeWarning)
        runpy.run_module(req["module"], run_name="__main__", alter_sys=True)


def preload(names: tuple[str, ...]) -> list[str]:
    """Import ``names``; the ones that could not be imported, with why (a run imports those itself)."""
    import importlib

    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - an optional module: the run imports it, or fails, itself
            missing.append(f"{name} ({type(exc).__name__}: {exc})")
    return missing


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def serve(key: str, idle_s: float = IDLE_S, owners: set[int] | None = None, extra: tuple[str, ...] = ()) -> _Job | None:
    """Be the server for ``key`` until idle for ``idle_s``, its socket is gone or SIGTERM; returns the job in a
    forked copy (which then becomes the run), None in the server when it ends. It imports :func:`preload_names`
    with the caller's ``extra``."""
    import gc
    import threading

    where = folder()
    path, lock_path = where / f"{key}.sock", where / f"{key}.lock"
    lock = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        return None  # another server for this key is up or starting
    started = time.monotonic()
    if cuda_may_be_visible(dict(os.environ)):
        print("voxelflow warm start: a CUDA device may be visible; not serving", file=sys.stderr)
        return None
    missing = preload(preload_names(dict(os.environ), extra))
    if threading.active_count() != 1:
        print(f"voxelflow warm start: preloading started threads ({threading.enumerate()}); not serving",
              file=sys.stderr)
        return None
    gc.collect()
    gc.freeze()  # what is here now stays in the copies' permanent generation: their collections leave it untouched
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staged = where / f"{key}.{os.getpid()}.sock"
    staged.unlink(missing_ok=True)
    with socket_address(staged) as address:
        listener.bind(address)
    os.chmod(staged, 0o600)
    listener.listen(64)
    os.replace(staged, path)
    inode = path.stat().st_ino
    print(json.dumps({"event": "warm.serving", "key": key, "pid": os.getpid(), "at": round(time.time(), 3),
                      "preload_s": round(time.monotonic() - started, 2), "missing": missing}), flush=True)

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    stopping = []
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "accept")
    sel.register(wake_r, selectors.EVENT_READ, "wake")
    children: dict[int, socket.socket] = {}  # pid -> the caller's connection
    last = time.monotonic()

    def add_owner(request: dict) -> None:  # the process that started the caller (a worker): the server ends with it
        if isinstance(request.get("owner"), int) and request["owner"] > 1 and owners is not None:
            owners.add(request["owner"])

    def reap() -> None:
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = children.pop(pid, None)
            if conn is None:
                continue
            ended = ({"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status)
                     else {"code": os.WEXITSTATUS(status)})
            try:
                _send(conn, ended)
            except OSError:
                pass
            with contextlib.suppress(KeyError):
                sel.unregister(conn)
            conn.close()

    while True:
        listening = not stopping
        try:
            listening = listening and path.stat().st_ino == inode
        except OSError:
            listening = False
        if not listening:
            if listener.fileno() >= 0:
                sel.unregister(listener)
                listener.close()
                if stopping:
                    for pid in children:
                        try:
                            os.killpg(pid, signal.SIGTERM)
                        except ProcessLookupError:
                            pass
            if not children:
                break
        elif not children and (time.monotonic() - last > idle_s or (owners and not any(map(_alive, owners)))):
            break  # idle, or every worker that used it has ended
        for ready, _ in sel.select(timeout=2.0):
            if ready.data == "wake":
                try:
                    while os.read(wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
                reap()
            elif ready.data == "accept":
                try:
                    conn, _ = listener.accept()
                except OSError:
                    continue
                last = time.monotonic()
                try:
                    conn.settimeout(10)
                    if _peer_uid(conn) != os.getuid():
                        _send(conn, {"error": "another user"})
                        conn.close()
                        continue
                    request, fds = _receive(conn, want_fds=3)
                    conn.settimeout(None)
                except (OSError, ValueError, WarmError):
                    conn.close()
                    continue
                if request is not None and not fds and set(request) == {"owner"}:  # a worker that will send runs
                    add_owner(request)
                    with contextlib.suppress(OSError):
                        _send(conn, {"owners": len(owners or ())})
                    conn.close()
                    continue
                if request is None or len(fds) != 3 or not isinstance(request.get("module"), str):
                    for fd in fds:
                        os.close(fd)
                    conn.close()
                    continue
                sys.stdout.flush()
                sys.stderr.flush()
                signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)  # none may reach the copy before its handlers reset
                pid = os.fork()
                if pid == 0:  # the copy: keep only the caller's descriptors, become the run
                    os.setpgid(0, 0)
                    sel.close()
                    for held in [listener, conn, *children.values()]:
                        held.close()
                    for fd in (lock, wake_r, wake_w):
                        os.close(fd)
                    return _Job(request, fds)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
                try:
                    os.setpgid(pid, pid)  # also here, so the caller's first signal finds the group
                except OSError:
                    pass
                for fd in fds:
                    os.close(fd)
                children[pid] = conn
                add_owner(request)
                sel.register(conn, selectors.EVENT_READ, pid)
                try:
                    _send(conn, {"pid": pid})
                except OSError:
                    pass
            else:  # a caller's connection: it ended (the caller was killed) while its run goes on
                pid = ready.data
                try:
                    data = ready.fileobj.recv(1)
                except OSError:
                    data = b""
                if not data:
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    sel.unregister(ready.fileobj)
        reap()
    try:
        if path.stat().st_ino == inode:
            path.unlink()
    except OSError:
        pass
    os.close(lock)
    return None


def main(argv: list[str] | None = None) -> None:
    """``python -m voxelflow.core.warm_server KEY [--idle-seconds S] [--owner PID]`` (what a caller starts)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    idle = float(argv[argv.index("--idle-seconds") + 1]) if "--idle-seconds" in argv else IDLE_S
    owners = {int(argv[argv.index("--owner") + 1])} if "--owner" in argv else set()
    extra = module_names(argv[argv.index("--preload") + 1]) if "--preload" in argv else ()
    job = serve(argv[0], idle, owners, extra)
    if job is not None:  # a forked copy: be the caller's run
        job.become()


if __name__ == "__main__":
    main()
