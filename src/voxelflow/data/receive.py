"""Receiving DICOM over the network: a Storage SCP (with Verification) that streams instances into the spool.

:class:`Receiver` listens for associations (pynetdicom; TLS with :func:`tls_context`). A caller is let
in only when its calling AE title, and the host it calls from, are on the allow-list
(``VOXELFLOW_DICOM_CALLERS``: ``AE_TITLE`` or ``AE_TITLE@host``, comma-separated; an empty list lets
no one in) and it calls this receiver's AE title; any other association is rejected and audited
(``dicom.association.rejected``). Each association is bounded (:class:`Limits`): the PDU size it may
send, the instances and bytes it may send, the associations open at once, the bytes on the spool. A
PDU is checked from its 6-byte header before its body is read, so an association over a limit is
aborted before the bytes over it are held; what it had sent is dropped and the abort is audited
(``dicom.association.aborted``, with the limit). Instances are written to disk as they arrive
(pynetdicom's chunked receiving, into the spool's own temporary folder) and moved into the spool by
content hash (:mod:`voxelflow.data.spool`): no series is ever held in memory.

A released association's instances join their series (``dicom.association.released``). A series is
complete when no association that sent to it is still open and nothing of it arrived for
``settle_s``: it is then handed to ``emit`` as an :class:`~voxelflow.data.watch.Arrival` (the CLI
sends it as ``voxelflow.data.arrived``), with the event id, cursor and payload of ``voxelflow watch``:
its source is the series' folder in the spool, its objects the instances not announced before, named
by hashes only. The cursor (table ``cursors``) is written after ``emit`` returned; a series that a
crash left unannounced is announced at the next start, under the same id.

pynetdicom's settings are process-wide: while a receiver runs it receives C-STORE datasets in chunks,
logs none of pynetdicom's per-message lines (they name UIDs) and makes its temporary files in the
spool. One receiver runs per process.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from voxelflow.core import audit
from voxelflow.core.db import Database
from voxelflow.core.redact import redact_exc
from voxelflow.data.spool import Instance, Spool, hashed
from voxelflow.data.watch import Arrival, get_cursor, run_steps, set_cursor

ACTOR = "voxelflow-receive"
CONTROL_PDU_MAX = 1 << 20  # association requests and other PDUs that are not P-DATA
_ABORT_PDU = struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0, 0)  # A-ABORT, source: the service user
_P_DATA = 0x04
_running = threading.Lock()  # one receiver per process (pynetdicom's configuration is global)


@dataclass(frozen=True)
class Caller:
    """One allowed caller: an AE title, and the host it must call from (None: any host)."""

    ae_title: str
    host: str | None = None


def parse_callers(text: str) -> list[Caller]:
    """``VOXELFLOW_DICOM_CALLERS`` read: ``AE_TITLE`` or ``AE_TITLE@host``, comma-separated; a malformed
    entry is a clear error."""
    out = []
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        ae, at, host = item.partition("@")
        ae, host = ae.strip(), host.strip()
        if not ae or len(ae) > 16 or "\\" in ae or not ae.isascii() or not ae.isprintable():
            raise ValueError(f"VOXELFLOW_DICOM_CALLERS: {item!r} does not start with an AE title "
                             "(1 to 16 ASCII characters, no backslash)")
        if at and not host:
            raise ValueError(f"VOXELFLOW_DICOM_CALLERS: {item!r} names no host after '@'")
        out.append(Caller(ae, host or None))
    return out


def _addresses(host: str) -> set[str]:
    """Every address ``host`` resolves to (an address is itself); an unknown name is a clear error."""
    try:
        return {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError as exc:
        raise ValueError(f"VOXELFLOW_DICOM_CALLERS: the host {host!r} does not resolve ({exc})") from None


@dataclass(frozen=True)
class Limits:
    """What one association, and the receiver, may take (see the ``dicom_*`` and ``spool_*`` settings)."""

    max_pdu: int = 262144
    max_instances: int = 10000
    max_bytes: int = 4 << 30
    max_associations: int = 4
    spool_max_bytes: int = 20 << 30

    @classmethod
    def from_settings(cls, settings: Any) -> Limits:
        return cls(settings.dicom_max_pdu, settings.dicom_max_instances, settings.dicom_max_bytes,
                   settings.dicom_max_associations, settings.spool_max_bytes)


def tls_context(cert: str | None, key: str | None, ca: str | None) -> ssl.SSLContext | None:
    """The server's TLS context from PEM files (None when none is set); with ``ca`` a caller must present a
    certificate that CA signed."""
    if not (cert or key or ca):
        return None
    if not (cert and key):
        raise ValueError("VOXELFLOW_DICOM_TLS_CERT and VOXELFLOW_DICOM_TLS_KEY are set together")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if ca:
        ctx.load_verify_locations(ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@dataclass(eq=False)
class _Association:
    """What the receiver knows of one accepted association."""

    id: str
    assoc: Any  # the pynetdicom Association
    caller: str  # hashed AE title
    host: str  # hashed address
    instances: list[Instance] = field(default_factory=list)
    received: int = 0  # P-DATA bytes read
    refused: int = 0  # instances answered with a failure (not DICOM, no study or series)
    over: str | None = None  # the limit it went over
    ended: bool = False


class LimitExceeded(ConnectionAbortedError):
    """A peer's PDU would take an association over a limit: the association is aborted."""


def _classes():
    """The server's pynetdicom classes (imported when a receiver starts, never at import time)."""
    from pynetdicom.transport import AssociationSocket, RequestHandler

    class BoundedSocket(AssociationSocket):
        """Checks each PDU's header against the limits before its body is read."""

        receiver: Receiver
        _header = True  # the next read is a PDU's header

        def recv(self, nr_bytes: int) -> bytearray:
            data = super().recv(nr_bytes)
            if not self._header:
                self._header = True
                return data
            if len(data) == 6:
                pdu_type, _, length = struct.unpack(">BBL", bytes(data))
                self._header = not 0x01 <= pdu_type <= 0x07  # a body follows
                reason = self.receiver._admit(self._assoc, pdu_type, length)
                if reason is not None:
                    try:
                        self.socket.sendall(_ABORT_PDU)
                    except OSError:
                        pass
                    raise LimitExceeded(reason)
            return data

    class Handler(RequestHandler):
        def _create_association(self):
            assoc = super()._create_association()
            assoc.dul.socket.__class__ = BoundedSocket  # the same socket, its reads checked
            assoc.dul.socket.receiver = self.server.receiver
            return assoc

    return Handler


class Receiver:
    """A Storage SCP for one pipeline: instances into ``spool``, settled series to ``emit``.

    ``callers`` is the allow-list (text as in ``VOXELFLOW_DICOM_CALLERS`` or parsed); ``port`` 0 picks a
    free port (:attr:`port` says which once started)."""

    def __init__(self, spool: Spool, db: Database, emit: Callable[[Arrival], None], *,
                 callers: str | list[Caller], limits: Limits = Limits(), ae_title: str = "VOXELFLOW",
                 host: str = "127.0.0.1", port: int = 11112, settle_s: float = 2.0,
                 ssl_context: ssl.SSLContext | None = None, network_timeout_s: float = 60.0) -> None:
        self.spool, self.db, self.emit, self.limits = spool, db, emit, limits
        self.callers = parse_callers(callers) if isinstance(callers, str) else list(callers)
        self.allowed: dict[str, set[str] | None] = {}  # AE title -> addresses it may call from (None: any)
        for c in self.callers:
            if c.host is None or self.allowed.get(c.ae_title, set()) is None:
                self.allowed[c.ae_title] = None
            else:
                self.allowed.setdefault(c.ae_title, set()).update(_addresses(c.host))
        if not ae_title or len(ae_title) > 16:
            raise ValueError(f"the AE title {ae_title!r} is not 1 to 16 characters")
        self.ae_title, self.host, self.port, self.settle_s = ae_title, host, port, settle_s
        self.ssl_context, self.network_timeout_s = ssl_context, network_timeout_s
        self.cursor = f"receive:{spool.pipeline}:{spool.store.url_of(spool.prefix)}"
        self.announced: dict[str, str] = {}
        self._lock = threading.RLock()
        self._live: dict[int, _Association] = {}  # id(pynetdicom Association) -> its state
        self._open: dict[str, set[str]] = {}  # series key -> ids of open associations that sent to it
        self._arrived: dict[str, float] = {}  # series key -> when something of it last joined the spool
        self._spool_used, self._spool_counted = 0, 0.0
        self.errors: list[str] = []
        self._server = self._thread = None
        self._saved: tuple | None = None

    # ------------------------------------------------------------ lifecycle
    def start(self) -> Receiver:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
        from pynetdicom.sop_class import Verification
        from pynetdicom.transport import ThreadedAssociationServer

        if not _running.acquire(blocking=False):
            raise RuntimeError("a DICOM receiver already runs in this process")
        try:
            self.spool.prepare()
            self.announced = get_cursor(self.db, self.cursor) or {}
            now = time.monotonic()
            for key in self.spool.series():  # left unannounced by a process that stopped: announce after settle
                if any(self.announced.get(o["key"]) != o["version"] for o in self.spool.objects(key)):
                    self._arrived[key] = now
            self._count_spool(force=True)
            self._saved = (_config.STORE_RECV_CHUNKED_DATASET, _config.LOG_HANDLER_LEVEL, tempfile.tempdir)
            _config.STORE_RECV_CHUNKED_DATASET, _config.LOG_HANDLER_LEVEL = True, "none"
            tempfile.tempdir = str(self.spool.tmp)
            ae = AE(ae_title=self.ae_title)
            ae.maximum_pdu_size = self.limits.max_pdu
            ae.maximum_associations = 4 * self.limits.max_associations + 8  # the receiver's own check comes first
            ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = self.network_timeout_s
            ae.add_supported_context(Verification)
            for cx in AllStoragePresentationContexts:
                ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
            handlers = [(evt.EVT_REQUESTED, self._on_requested), (evt.EVT_C_STORE, self._on_store),
                        (evt.EVT_RELEASED, self._on_released), (evt.EVT_ABORTED, self._on_aborted),
                        (evt.EVT_CONN_CLOSE, self._on_closed)]
            self._server = ae.make_server((self.host, self.port), evt_handlers=handlers, ssl_context=self.ssl_context,
                                          server_class=ThreadedAssociationServer, request_handler=_classes())
            self._server.receiver = self
            ae._servers.append(self._server)  # as ae.start_server does: ae.shutdown() stops it
            self._ae = ae
            self.port = self._server.server_address[1]
            self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                            daemon=True, name="voxelflow-receive")
            self._thread.start()
        except BaseException:
            self._restore()
            raise
        return self

    def stop(self) -> None:
        """Stop listening; associations still open are aborted and what they sent is dropped."""
        if self._server is not None:
            self._ae.shutdown()  # aborts the open associations, stops and closes the server
            self._server = None
            for state in list(self._live.values()):
                state.assoc.join(timeout=self.network_timeout_s)  # its handlers have returned
                self._end(state, released=False, reason="the receiver stopped")
            if not self._live:  # nothing staged belongs to a live association any more: none is kept
                self.spool.prepare()
        self._restore()

    def _restore(self) -> None:
        if self._saved is not None:
            from pynetdicom import _config

            _config.STORE_RECV_CHUNKED_DATASET, _config.LOG_HANDLER_LEVEL, tempfile.tempdir = self._saved
            self._saved = None
            self._sweep_tmp(older_than=0)
            _running.release()

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def run(self, stop: threading.Event, on_error: Callable[[Exception], None] | None = None,
            on_start: Callable[[], None] | None = None) -> None:
        """Until ``stop`` is set: receive, and announce each settled series. An announcement that fails
        raises, or with ``on_error`` is reported to it and tried again a moment later. ``on_start`` is
        called once the server listens."""
        self.start()
        try:
            if on_start is not None:
                on_start()
            run_steps(stop, self.step, on_error, pause_s=lambda: min(0.5, max(0.05, self.settle_s / 4)),
                      retry_s=max(1.0, self.settle_s))
        finally:
            self.stop()

    # ------------------------------------------------------------ associations
    def _refusal(self, assoc) -> tuple[str, tuple[int, int, int]] | None:
        rq = assoc.requestor.primitive
        calling, called = str(rq.calling_ae_title).strip(), str(rq.called_ae_title).strip()
        if called != self.ae_title:
            return "the called AE title is not this receiver's", (0x01, 0x01, 0x07)
        if not self.allowed:
            return "no caller is allowed: VOXELFLOW_DICOM_CALLERS is empty", (0x01, 0x01, 0x03)
        if calling not in self.allowed:
            return "the calling AE title is not in VOXELFLOW_DICOM_CALLERS", (0x01, 0x01, 0x03)
        hosts = self.allowed[calling]
        if hosts is not None and assoc.requestor.address not in hosts:
            return "the calling AE title may call only from another host", (0x01, 0x01, 0x03)
        if sum(not s.ended for s in self._live.values()) >= self.limits.max_associations:
            return (f"VOXELFLOW_DICOM_MAX_ASSOCIATIONS ({self.limits.max_associations}) associations are open",
                    (0x02, 0x03, 0x02))
        return None

    def _on_requested(self, event) -> None:
        assoc = event.assoc
        rq = assoc.requestor.primitive
        caller, host = hashed(str(rq.calling_ae_title).strip()), hashed(str(assoc.requestor.address))
        with self._lock:
            refusal = self._refusal(assoc)
            if refusal is None:
                self._live[id(assoc)] = _Association(uuid.uuid4().hex[:16], assoc, caller, host)
                return
        reason, rsd = refusal
        audit.append(self.db, "dicom.association.rejected", ACTOR, pipeline=self.spool.pipeline, caller=caller,
                     host=host, reason=reason)
        assoc.acse.send_reject(*rsd)
        assoc.kill()  # as pynetdicom's own rejections: returns once the rejection was sent

    def _admit(self, assoc, pdu_type: int, length: int) -> str | None:
        """Why a PDU of ``pdu_type`` and ``length`` (from its header) is refused, or None (bytes counted)."""
        limit = self.limits.max_pdu if pdu_type == _P_DATA else max(CONTROL_PDU_MAX, self.limits.max_pdu)
        state = self._live.get(id(assoc))
        reason = None
        if length > limit:
            reason = f"a PDU of {length} bytes is over VOXELFLOW_DICOM_MAX_PDU ({limit})"
        elif pdu_type == _P_DATA and state is not None:
            with self._lock:
                state.received += length
                if state.received > self.limits.max_bytes:
                    reason = f"the association sent more than VOXELFLOW_DICOM_MAX_BYTES ({self.limits.max_bytes})"
                elif self._spool_in_use() > self.limits.spool_max_bytes:
                    self._count_spool(force=True)  # the spool may have been emptied meanwhile
                    if self._spool_in_use() > self.limits.spool_max_bytes:
                        reason = f"the spool would hold more than VOXELFLOW_SPOOL_MAX_BYTES ({self.limits.spool_max_bytes})"
        if reason is not None and state is not None and state.over is None:
            state.over = reason
        return reason

    def _on_store(self, event) -> int:
        state = self._live.get(id(event.assoc))
        path = event.dataset_path
        if state is None or state.over is not None:
            Path(path).unlink(missing_ok=True)
            return 0xA700
        if len(state.instances) >= self.limits.max_instances:
            state.over = f"the association sent more than VOXELFLOW_DICOM_MAX_INSTANCES ({self.limits.max_instances})"
            Path(path).unlink(missing_ok=True)
            event.assoc.abort()
            return 0xA700
        try:
            instance = self.spool.stage(path, state.id)
        except ValueError:
            state.refused += 1
            return 0xC000
        with self._lock:
            if state.ended:  # dropped while this instance was being staged: it goes with the rest
                instance.staged.unlink(missing_ok=True)
                return 0xA700
            state.instances.append(instance)
            self._open.setdefault(self.spool.series_key(instance.study, instance.series), set()).add(state.id)
        return 0x0000

    def _on_released(self, event) -> None:
        state = self._live.get(id(event.assoc))
        if state is not None:
            self._end(state, released=True)

    def _on_aborted(self, event) -> None:
        state = self._live.get(id(event.assoc))
        if state is not None:
            self._end(state, released=False, reason=state.over or "the association was aborted")

    def _on_closed(self, event) -> None:
        state = self._live.get(id(event.assoc))
        if state is not None:
            self._end(state, released=False,
                      reason=state.over or "the association was aborted, or its connection closed, without a release")

    def _end(self, state: _Association, released: bool, reason: str | None = None) -> None:
        """Commit a released association's instances, or drop an aborted one's; audit either."""
        with self._lock:
            if state.ended:
                return
            state.ended = True
        series = {self.spool.series_key(i.study, i.series) for i in state.instances}
        size = sum(i.size for i in state.instances)
        try:
            if released and state.over is None:
                added = self.spool.commit(state.instances)
                self.spool.release_staging(state.id)
                audit.append(self.db, "dicom.association.released", ACTOR, pipeline=self.spool.pipeline,
                             caller=state.caller, host=state.host, instances=len(state.instances),
                             bytes=size, series=len(series), new=len(added), refused=state.refused)
            else:
                message = getattr(getattr(state.assoc, "dimse", None), "message", None)
                self.spool.drop(state.id, getattr(message, "_data_set_path", None))  # and the instance in transit
                added = []
                audit.append(self.db, "dicom.association.aborted", ACTOR, pipeline=self.spool.pipeline,
                             caller=state.caller, host=state.host, reason=reason or state.over,
                             dropped=len(state.instances), bytes=state.received)
        except Exception as exc:  # the association's work failed: dropped, reported, audited
            self.spool.drop(state.id)
            added = []
            self.errors.append(f"an association's instances were not kept: {redact_exc(exc)}")
            audit.append(self.db, "dicom.association.failed", ACTOR, pipeline=self.spool.pipeline,
                         caller=state.caller, host=state.host, reason=redact_exc(exc))
        finally:
            with self._lock:
                self._live.pop(id(state.assoc), None)
                now = time.monotonic()
                for key in series:
                    self._open.get(key, set()).discard(state.id)
                    if not self._open.get(key):
                        self._open.pop(key, None)
                for key in {k.rsplit("/", 1)[0] for k in added}:
                    self._arrived[key] = now
                self._spool_used += sum(i.size for i in state.instances if self.spool.instance_key(i) in added)
                idle = not self._live
            self._sweep_tmp(older_than=0 if idle else 2 * self.network_timeout_s)

    # ------------------------------------------------------------ the spool
    def _count_spool(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._spool_counted > 5.0:
            committed = self.spool.used_bytes() - sum(
                i.size for s in self._live.values() for i in s.instances)  # staged ones are counted as received
            self._spool_used, self._spool_counted = max(0, committed), now

    def _spool_in_use(self) -> int:
        self._count_spool()
        return self._spool_used + sum(s.received for s in self._live.values() if not s.ended)

    def _sweep_tmp(self, older_than: float) -> None:
        """Remove the DICOM stack's temporary files (instances in transit) no open association writes to."""
        now = time.time()
        for path in self.spool.tmp.glob("tmp*.dcm"):
            try:
                if now - path.stat().st_mtime >= older_than:
                    path.unlink()
            except FileNotFoundError:
                pass

    # ------------------------------------------------------------ announcing
    def step(self, at: float | None = None) -> list[Arrival]:
        """Announce every series that has settled; returns the arrivals emitted. An ``emit`` that raises
        leaves its series unannounced (tried again at the next step) and raises; so does an error of the
        receiving threads (once)."""
        at = time.monotonic() if at is None else at
        if self.errors:
            raise RuntimeError(self.errors.pop(0))
        for state in [s for s in list(self._live.values()) if not s.assoc.is_alive()]:
            self._end(state, released=False, reason=state.over or "the association ended without a release")
        with self._lock:
            due = sorted(k for k, t in self._arrived.items() if not self._open.get(k) and at - t >= self.settle_s)
        out = []
        for key in due:
            arrival = self.spool.announce(key, self.announced, self.cursor, self.emit)
            if arrival is not None:
                set_cursor(self.db, self.cursor, self.announced)
                out.append(arrival)
            with self._lock:
                if self._arrived.get(key, at + 1) <= at:
                    self._arrived.pop(key, None)
        return out


def receive_spool(store_url: str, pipeline: str, home: str | os.PathLike) -> Spool:
    """The spool of ``pipeline`` in the store at ``store_url``; staging in the store when it is local,
    else under ``home``."""
    from voxelflow.core.storage import Store

    store = Store(store_url)
    return Spool(store, pipeline, None if store.local else Path(home) / "spool-incoming")
