"""Training in several processes (DistributedDataParallel): rank 0 starts the other ranks and supervises
them (a rank that dies fails the training at once, with its error), each rank joins the process group
(NCCL on GPUs, gloo on CPUs) with the steps' collectives on a short timeout of their own, and batch norms
are synced across the ranks where torch can."""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from typing import Any, Callable, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

#: the process group's own timeout: the rendezvous (each rank starts, reading its cache, before it joins)
#: and the other ranks' wait at the end of an epoch while rank 0 validates. The steps' collectives have
#: ``train.collective_timeout_s``.
SETUP_TIMEOUT_S = 1800


def run_ranks(world: int, rank_fn: Callable[..., Any], args: tuple, lead: Callable[[tuple[int, int, int]], T]) -> T:
    """Start ranks ``1..world-1`` as spawned processes, each calling ``rank_fn(*args, (rank, world, port))``
    (a module-level function: it is pickled by name), then run ``lead((0, world, port))`` here as rank 0
    under a :class:`_Supervisor`; a rank that died is raised as :class:`RankFailed`."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:  # a free loopback port for the group's rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")  # never fork a process that holds threads or a CUDA context
    errors = ctx.SimpleQueue()
    ranks = [ctx.Process(target=_rank, args=(rank_fn, args, rank, world, port, errors), daemon=True)
             for rank in range(1, world)]
    for proc in ranks:
        proc.start()
    supervisor = _Supervisor(ranks, errors)
    try:
        result = lead((0, world, port))
    except BaseException as exc:
        dead = supervisor.failure(wait=10.0)  # a rank that died is why the collective failed: say which
        if dead:
            raise dead from exc
        raise
    finally:
        supervisor.stop()
        for proc in ranks:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    dead = supervisor.failure(wait=0.0)
    if dead:
        raise dead
    return result


def _rank(rank_fn: Callable[..., Any], args: tuple, rank: int, world: int, port: int, errors) -> None:
    """A training process other than rank 0; its error goes to rank 0's supervisor before it exits."""
    try:
        rank_fn(*args, (rank, world, port))
    except BaseException as exc:
        errors.put((rank, f"{type(exc).__name__}: {exc}"[:2000]))
        raise


def join_group(rank: int, world: int, port: int, dev, collective_timeout_s: float):
    """Join the process group as ``rank`` on ``dev`` (its own GPU of the node; a CPU rank takes its share of
    the cores); returns the rank's device and the group of the steps' collectives, on the short timeout."""
    import torch
    import torch.distributed as dist

    if dev.type == "cuda":
        dev = torch.device("cuda", rank)
        torch.cuda.set_device(dev)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=SETUP_TIMEOUT_S))
    # the steps' collectives in a group of their own, with the short timeout: a rank that stops taking
    # part (alive, so the supervisor sees nothing) fails the others within it instead of 30 minutes
    return dev, dist.new_group(timeout=datetime.timedelta(seconds=collective_timeout_s))


def leave_group() -> None:
    """Leave (and destroy) this process's group."""
    import torch.distributed as dist

    dist.destroy_process_group()



class RankFailed(RuntimeError):
    """A training process other than rank 0 died: its error (or exit code) is the message. Worth a retry
    (from the newest checkpoint) when it was killed by a signal (a preempted or lost node), not when
    it raised: that error would come again."""

    def __init__(self, message: str, killed: bool = False):
        super().__init__(message)
        self.transient = killed


class _Supervisor:
    """Watches the other ranks from a thread of rank 0. When one dies (an exception, out of memory, a
    kill), the process group is aborted, so rank 0's pending collective fails at once instead of
    waiting for the collective timeout (NCCL would then kill the whole process, and Prefect's retry
    with it); the training then fails with that rank's error and a retry resumes from the newest
    checkpoint."""

    def __init__(self, ranks: list, errors):
        self.ranks, self.errors = ranks, errors
        self.messages: dict[int, str] = {}
        self.dead: RankFailed | None = None
        self._lock = threading.Lock()  # the watcher and rank 0's failure() both look
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="voxelflow-rank-supervisor", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            if self._check():
                _abort_group()
                return

    def _check(self) -> bool:
        with self._lock:
            return self._look()

    def _look(self) -> bool:
        if self.dead is not None:
            return True
        while not self.errors.empty():
            rank, message = self.errors.get()
            self.messages[rank] = message
        for rank, proc in enumerate(self.ranks, start=1):
            code = proc.exitcode
            if code not in (None, 0) or rank in self.messages:
                if code is None:
                    proc.join(timeout=5)  # it reported its error and is exiting
                    code = proc.exitcode
                killed = code is not None and code < 0
                how = (f"killed by signal {-code}" if killed else f"exit code {code}" if code is not None
                       else "raised, still exiting")
                self.dead = RankFailed(f"training process {rank} failed ({how}): "
                                       f"{self.messages.get(rank, 'no error reported')}", killed=killed)
                return True
        return False

    def failure(self, wait: float) -> RankFailed | None:
        """The first rank that died, waiting up to ``wait`` seconds for one to be seen dying."""
        deadline = time.monotonic() + wait
        while not self._check() and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.dead

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _abort_group() -> None:
    """Make collectives blocked in this process fail now (NCCL; gloo already fails on a lost peer)."""
    import torch.distributed as dist

    try:
        if dist.is_initialized() and dist.get_backend() == "nccl":
            from torch.distributed.distributed_c10d import _abort_process_group

            _abort_process_group()
    except Exception as exc:  # noqa: BLE001 - best effort: the collective timeout remains the bound
        log.warning("could not abort the process group (%s: %s)", type(exc).__name__, exc)


def sync_batch_norms(model, device_type: str):
    """Batch norms of a network trained in several processes compute their statistics over the whole
    batch (SyncBatchNorm; same parameters and buffers, so the weights load into the plain network):
    otherwise each process normalises by its own share of the batch. torch syncs them on GPUs only;
    on gloo processes on the CPU they stay per process, and the log says so."""
    import torch

    norms = (torch.nn.modules.batchnorm._BatchNorm,)
    if not any(isinstance(m, norms) for m in model.modules()):
        return model
    if device_type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    log.warning("the network has batch norms and trains in several CPU processes: their statistics are per "
                "process there (torch syncs batch norms on GPUs only); use instance norm or one process for "
                "the steps of one process with the whole batch")
    return model

