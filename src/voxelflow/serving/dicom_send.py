"""Sending DICOM results back into the hospital's PACS, once per model version, kept until they arrive.

A destination is a URL: ``dicom://AE_TITLE@host:port`` (a C-STORE to that Storage SCP, calling from
``Settings.dicom_ae_title``, over TLS when ``dicom_send_tls_ca`` is set) or ``dicomweb+http://host/path``
and ``dicomweb+https://...`` (STOW-RS to that DICOMweb root, credentials from ``dicomweb_*``). A URL
never carries credentials: one that does is refused without being repeated.

Each object (a case's SEG or SR by one model version) is sent under a row of the ``sends`` table,
claimed before it goes out: a result already ``sent`` to a destination is not sent there again, and two
senders at once send it once. An error that may pass (connection refused or reset, a timeout, an HTTP
5xx or 429, DICOM status 0xA7xx "out of resources", an association rejected as transient) is retried
``dicom_send_attempts`` times with a doubling backoff; if it lasts, the row stays ``pending`` and
:func:`resend` sends it later. A refusal (an HTTP 4xx, a DICOM failure status such as 0xA9xx or
0xCxxx, an association rejected as permanent) is not retried: the row is ``refused`` with the reason.
Every outcome is audited as ``dicom.sent`` with the SOP Instance UID hashed as the spool hashes UIDs
(:func:`voxelflow.data.spool.hashed`) and the destination as its URL (no credentials).
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import unquote, urlsplit

import fsspec
from sqlalchemy import insert, or_, select, update

from voxelflow.core import audit, redact, transient
from voxelflow.core.db import Database, now, sends
from voxelflow.core.settings import Settings
from voxelflow.data.spool import hashed

SENT, PENDING, REFUSED, SENDING = "sent", "pending", "refused", "sending"
KINDS = ("seg", "sr")  # the result objects of a prediction of DICOM input, as its report names them
STALE = timedelta(minutes=30)  # a row left "sending" this long ago: its sender died, it may be claimed again
_WARNING = {0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007}  # stored, with a warning
USAGE = "a destination is dicom://AE_TITLE@host:port or dicomweb+http(s)://host/path"


class DestinationError(ValueError):
    """A destination URL voxelflow cannot send to (the message says why, without credentials)."""


class SendFailed(Exception):
    """One object (or the connection for it) failed; ``transient`` says whether another attempt may succeed."""

    def __init__(self, message: str, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


# ---------------------------------------------------------------- destinations


def _ae_title(text: str) -> str:
    if not 1 <= len(text) <= 16 or not text.strip() or "\\" in text or not all(" " <= c <= "~" for c in text):
        raise DestinationError(f"{text!r} is no AE title (1 to 16 printable ASCII characters, no backslash)")
    return text.strip()


@dataclass(frozen=True)
class Destination:
    """A parsed destination; ``str()`` is its URL as recorded and audited."""

    scheme: str  # dicom, dicomweb+http or dicomweb+https
    host: str
    port: int
    ae_title: str = ""  # the called AE title (dicom://)
    path: str = ""  # the DICOMweb root's path (dicomweb+...)

    @classmethod
    def parse(cls, text: str) -> Destination:
        text = (text or "").strip()
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError as exc:
            raise DestinationError(f"{USAGE}: {redact.redact(text)!r} has a bad port ({exc})") from None
        scheme = parts.scheme.lower()
        if scheme not in ("dicom", "dicomweb+http", "dicomweb+https"):
            raise DestinationError(f"{USAGE}, not {redact.redact(text)!r}")
        if parts.password is not None or (scheme != "dicom" and parts.username is not None):
            raise DestinationError(
                f"a destination carries no credentials ({scheme}://...): set VOXELFLOW_DICOMWEB_USERNAME and "
                "VOXELFLOW_DICOMWEB_PASSWORD, or VOXELFLOW_DICOMWEB_TOKEN")
        if parts.query or parts.fragment:
            raise DestinationError(f"{USAGE}: no query or fragment, not {redact.redact(text)!r}")
        if not parts.hostname:
            raise DestinationError(f"{USAGE}: {text!r} names no host")
        if scheme == "dicom":
            if not parts.username:
                raise DestinationError(f"{USAGE}: {text!r} names no AE title (dicom://AE_TITLE@host:port)")
            if port is None:
                raise DestinationError(f"{USAGE}: {text!r} names no port (dicom://AE_TITLE@host:port)")
            if parts.path not in ("", "/"):
                raise DestinationError(f"{USAGE}: {text!r} has a path; a DICOM destination has none")
            return cls(scheme, parts.hostname, port, ae_title=_ae_title(unquote(parts.username)))
        if port is not None and not 0 < port < 65536:
            raise DestinationError(f"{USAGE}: {text!r} has a bad port")
        default = 443 if scheme == "dicomweb+https" else 80
        return cls(scheme, parts.hostname, port or default, path=parts.path.rstrip("/"))

    @property
    def http_url(self) -> str:
        """The DICOMweb root as dicomweb-client reaches it (``http(s)://host:port/path``)."""
        return f"{self.scheme.removeprefix('dicomweb+')}://{self._netloc()}{self.path}"

    def _netloc(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        if self.scheme == "dicom":
            return f"dicom://{self.ae_title}@{self._netloc()}"
        return f"{self.scheme}://{self._netloc()}{self.path}"


# ---------------------------------------------------------------- transports


def _read(url: str):
    import pydicom

    with fsspec.open(url, "rb") as fh:
        return pydicom.dcmread(io.BytesIO(fh.read()))


def _status_says(status: int) -> tuple[bool, bool]:
    """(stored, transient) for a C-STORE response status."""
    if status == 0 or status in _WARNING:
        return True, False
    return False, (status & 0xFF00) == 0xA700  # out of resources: the one failure that may pass


class _StoreScu:
    """One association to a Storage SCP for the objects of a batch (C-STORE)."""

    def __init__(self, settings: Settings, dest: Destination, datasets: list[Any]) -> None:
        from pynetdicom import AE

        timeout = settings.dicom_send_timeout_s
        ae = AE(ae_title=settings.dicom_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
        contexts: dict[str, set[str]] = {}
        for ds in datasets:
            contexts.setdefault(str(ds.SOPClassUID), set()).add(str(ds.file_meta.TransferSyntaxUID))
        for sop_class, syntaxes in list(contexts.items())[:128]:
            ae.add_requested_context(sop_class, sorted(syntaxes))
        tls = None
        if settings.dicom_send_tls_ca:
            import ssl

            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=settings.dicom_send_tls_ca)
            if settings.dicom_send_tls_cert:
                context.load_cert_chain(settings.dicom_send_tls_cert, settings.dicom_send_tls_key)
            tls = (context, dest.host)
        self.dest = dest
        # The A-ASSOCIATE-RJ PDU as it arrives: a PACS that rejects and closes at once can beat pynetdicom's
        # check of the connection, which then reports an abort and drops the rejection it had received.
        rejections: list[Any] = []

        def on_pdu(event: Any) -> None:
            if type(event.pdu).__name__ == "A_ASSOCIATE_RJ":
                rejections.append(event.pdu)

        from pynetdicom import evt

        self.assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls,
                                  evt_handlers=[(evt.EVT_PDU_RECV, on_pdu)])
        rejected = self.assoc.acceptor.primitive if self.assoc.is_rejected else None
        if rejected is None and rejections and not self.assoc.is_established:
            rejected = rejections[0]
        if rejected is not None:
            passes = rejected.result == 0x02  # rejected (transient); 0x01 is permanent
            raise SendFailed(f"{dest} rejected the association ({'transient' if passes else 'permanent'}): "
                             f"{rejected.reason_str}", transient=passes)
        if not self.assoc.is_established:
            raise SendFailed(f"could not associate with {dest} (connection refused, reset or timed out)",
                             transient=True)

    def send(self, ds: Any) -> None:
        if not self.assoc.is_established:
            raise SendFailed(f"the association with {self.dest} ended before this object was sent", transient=True)
        try:
            status = self.assoc.send_c_store(ds)
        except ValueError as exc:  # no accepted presentation context for its SOP class or transfer syntax
            raise SendFailed(f"{self.dest} does not accept this object: {str(exc).split(' (')[0]}",
                             transient=False) from None
        if "Status" not in status:  # no answer: the DIMSE timeout or the association aborted
            raise SendFailed(f"{self.dest} did not answer the C-STORE", transient=True)
        stored, passes = _status_says(int(status.Status))
        if not stored:
            raise SendFailed(f"{self.dest} answered the C-STORE with status 0x{int(status.Status):04X}",
                             transient=passes)

    def close(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()


class _Stow:
    """STOW-RS to a DICOMweb root, one object per request."""

    def __init__(self, settings: Settings, dest: Destination, datasets: list[Any]) -> None:
        from voxelflow.data.dicomweb_watch import client

        self.dest = dest
        self.client = client(settings, dest.http_url)  # its own retries off: the attempts are ours

    def send(self, ds: Any) -> None:
        import requests

        try:
            answer = self.client.store_instances([ds])
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else None
            raise SendFailed(f"{self.dest} answered the STOW-RS with HTTP {code}",
                             transient=bool(transient.is_transient(exc))) from None
        except requests.RequestException as exc:
            raise SendFailed(f"could not reach {self.dest} ({type(exc).__name__})",
                             transient=bool(transient.is_transient(exc))) from None
        failed = list(getattr(answer, "FailedSOPSequence", []) or [])
        if failed:
            code = getattr(failed[0], "FailureReason", None)
            stored, passes = _status_says(int(code)) if code is not None else (False, False)
            raise SendFailed(f"{self.dest} refused the object in its STOW-RS answer"
                             + (f" (failure reason 0x{int(code):04X})" if code is not None else ""), transient=passes)

    def close(self) -> None:
        self.client._session.close()


def _connect(settings: Settings, dest: Destination, datasets: list[Any]):
    return (_StoreScu if dest.scheme == "dicom" else _Stow)(settings, dest, datasets)


# ---------------------------------------------------------------- the record of sends


@dataclass(frozen=True)
class Result:
    """One DICOM object of a prediction: the case, its kind (``seg``, ``sr``) and where it is stored."""

    case: str
    kind: str
    object: str


@dataclass
class SendReport:
    destination: str
    sent: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # already sent there (or being sent by another)
    pending: list[dict[str, Any]] = field(default_factory=list)  # transient failures: kept for a resend
    refused: list[dict[str, Any]] = field(default_factory=list)  # the destination refused: not retried

    def merge(self, other: SendReport) -> None:
        for name in ("sent", "skipped", "pending", "refused"):
            getattr(self, name).extend(getattr(other, name))

    def summary(self) -> dict[str, Any]:
        return {"destination": self.destination, "sent": len(self.sent), "skipped": len(self.skipped),
                "pending": len(self.pending), "refused": len(self.refused)}


def results_of(predicted: list[dict[str, Any]]) -> list[Result]:
    """The DICOM objects of a prediction report's ``predicted`` entries (their ``seg`` and ``sr``)."""
    return [Result(p["case"], kind, p[kind]) for p in predicted for kind in KINDS if p.get(kind)]


def _key(pipeline: str, model: str, version: str, dest: str, result: Result):
    return (sends.c.pipeline == pipeline, sends.c.model == model, sends.c.version == version,
            sends.c.destination == dest, sends.c.case_id == result.case, sends.c.kind == result.kind)


def _claim(db: Database, pipeline: str, model: str, version: str, dest: str, result: Result,
           sop: str) -> tuple[bool, int]:
    """Take the row of ``result`` at ``dest`` for sending: (claimed, attempts so far). Not claimed when it
    was sent, or another sender holds it (and is not stale). Under a lock: two senders claim one after the other."""
    with db.locked(f"dicom-send:{model}:{version}") as conn:
        row = conn.execute(select(sends.c.state, sends.c.attempts, sends.c.at).where(
            *_key(pipeline, model, version, dest, result))).first()
        if row is None:
            conn.execute(insert(sends).values(
                pipeline=pipeline, case_id=result.case, kind=result.kind, model=model, version=version,
                destination=dest, object=result.object, sop_instance=sop, state=SENDING, attempts=0, at=now()))
            return True, 0
        if row.state == SENT:
            return False, row.attempts
        at = row.at if row.at.tzinfo else row.at.replace(tzinfo=now().tzinfo)
        if row.state == SENDING and now() - at < STALE:
            return False, row.attempts
        taken = conn.execute(update(sends).where(
            *_key(pipeline, model, version, dest, result), sends.c.state == row.state, sends.c.at == row.at
        ).values(state=SENDING, object=result.object, sop_instance=sop, at=now())).rowcount
        return taken == 1, row.attempts


def _finish(db: Database, pipeline: str, model: str, version: str, dest: str, result: Result, sop: str,
            state: str, attempts: int, reason: str | None) -> dict[str, Any]:
    outcome = {"case": result.case, "kind": result.kind, "sop_instance": sop, "state": state,
               "attempts": attempts, "reason": reason}
    with db.transaction() as conn:
        conn.execute(update(sends).where(*_key(pipeline, model, version, dest, result)).values(
            state=state, attempts=attempts, reason=reason, at=now()))
        audit.append(db, "dicom.sent", "voxelflow", conn=conn, pipeline=pipeline, model=model, version=version,
                     destination=dest, case=result.case, kind=result.kind, sop_instance=sop, status=state,
                     attempts=attempts, reason=reason)
    return outcome


def send_results(db: Database, settings: Settings, destination: str | Destination, pipeline: str, model: str,
                 version: str, results: list[Result], sleep=time.sleep) -> SendReport:
    """Send each of ``results`` (the DICOM objects ``model`` ``version`` made for cases of ``pipeline``) to
    ``destination`` unless it was sent there before; see the module's doc for retries and records."""
    dest = destination if isinstance(destination, Destination) else Destination.parse(destination)
    report = SendReport(str(dest))
    todo: list[tuple[Result, Any, str, int]] = []  # result, dataset, hashed SOP Instance UID, attempts before
    for result in results:
        if result.kind not in KINDS:
            raise ValueError(f"a result is one of {', '.join(KINDS)}, not {result.kind!r}")
        try:
            ds = _read(result.object)
            sop = hashed(str(ds.SOPInstanceUID))
        except Exception as exc:  # noqa: BLE001 - the object is missing or no DICOM: this result's own failure
            if transient.is_transient(exc):
                raise
            report.refused.append({"case": result.case, "kind": result.kind, "sop_instance": None,
                                   "state": REFUSED, "attempts": 0,
                                   "reason": f"not readable as DICOM: {type(exc).__name__}"})
            continue
        claimed, before = _claim(db, pipeline, model, version, str(dest), result, sop)
        if claimed:
            todo.append((result, ds, sop, before))
        else:
            report.skipped.append({"case": result.case, "kind": result.kind, "sop_instance": sop})
    attempt, delay = 0, settings.dicom_send_backoff_s
    while todo:
        attempt += 1
        failures: list[tuple[Result, Any, str, int, SendFailed]] = []
        try:
            link = _connect(settings, dest, [t[1] for t in todo])
        except SendFailed as exc:
            failures = [(*t, exc) for t in todo]
        except Exception as exc:  # noqa: BLE001 - a bad TLS file, an unreachable name: classified like any error
            failed = SendFailed(f"could not connect to {dest}: {transient.reason(exc)}", transient.is_transient(exc))
            failures = [(*t, failed) for t in todo]
        else:
            try:
                for result, ds, sop, before in todo:
                    try:
                        link.send(ds)
                    except SendFailed as exc:
                        failures.append((result, ds, sop, before, exc))
                    else:
                        report.sent.append(_finish(db, pipeline, model, version, str(dest), result, sop, SENT,
                                                   before + attempt, None))
            finally:
                link.close()
        todo = []
        for result, ds, sop, before, exc in failures:
            if exc.transient and attempt < settings.dicom_send_attempts:
                todo.append((result, ds, sop, before))
                continue
            state = PENDING if exc.transient else REFUSED
            getattr(report, state).append(_finish(db, pipeline, model, version, str(dest), result, sop, state,
                                                  before + attempt, redact.redact(str(exc))[:500]))
        if todo:
            sleep(delay)
            delay *= 2
    return report


def pending(db: Database, pipeline: str | None = None, destination: str | Destination | None = None
            ) -> list[dict[str, Any]]:
    """The rows a resend would send: pending ones, and ones whose sender died while sending."""
    query = select(sends).where(or_(sends.c.state == PENDING, (sends.c.state == SENDING) & (
        sends.c.at < now() - STALE))).order_by(sends.c.id)
    if pipeline is not None:
        query = query.where(sends.c.pipeline == pipeline)
    if destination is not None:
        dest = destination if isinstance(destination, Destination) else Destination.parse(destination)
        query = query.where(sends.c.destination == str(dest))
    with db.transaction() as conn:
        return [r._asdict() for r in conn.execute(query)]


def _groups(rows: list[dict[str, Any]]) -> Iterator[tuple[tuple[str, str, str, str], list[Result]]]:
    groups: dict[tuple[str, str, str, str], list[Result]] = {}
    for r in rows:
        groups.setdefault((r["destination"], r["pipeline"], r["model"], r["version"]), []).append(
            Result(r["case_id"], r["kind"], r["object"]))
    yield from groups.items()


def resend(db: Database, settings: Settings, destination: str | Destination | None = None,
           pipeline: str | None = None, sleep=time.sleep) -> SendReport:
    """Send every pending result again (only those meant for ``destination`` when given), each to the
    destination it was meant for, with the same retries; what is sent is recorded and not sent again."""
    rows = pending(db, pipeline, destination)
    report = SendReport(str(destination) if destination else "recorded destinations")
    for (dest, pipe, model, version), results in _groups(rows):
        report.merge(send_results(db, settings, dest, pipe, model, version, results, sleep))
    return report


# ---------------------------------------------------------------- the command line's part


def describe(report: SendReport) -> str:
    return (f"{len(report.sent)} sent to {report.destination}, {len(report.skipped)} sent there before, "
            f"{len(report.pending)} pending (voxelflow predict --resend sends them), {len(report.refused)} refused")


def unsent_message(report: SendReport) -> str:
    """Why some results were not sent (the first reasons; no UIDs, no credentials)."""
    unsent = report.pending + report.refused
    return (f"{len(unsent)} result(s) not sent ({len(report.pending)} pending, {len(report.refused)} refused): "
            + "; ".join(f"{u['case']} {u['kind']}: {u['reason']}" for u in unsent[:3]))


def send_command(destination: str, pipeline: str, report: Any, echo, settings: Settings | None = None) -> SendReport:
    """``voxelflow predict --send``: send the DICOM results of a prediction report (``report.predicted``)."""
    from voxelflow.core.db import connect

    settings = settings or Settings()
    results = results_of(report.predicted)
    if not results:
        echo(f"nothing to send to {Destination.parse(destination)}: this run made no DICOM result", highlight=False)
        return SendReport(str(Destination.parse(destination)))
    sent = send_results(connect(settings.database), settings, destination, pipeline, report.model,
                        str(report.version), results)
    echo(describe(sent), highlight=False)
    return sent


def resend_command(destination: str | None, echo, settings: Settings | None = None) -> SendReport:
    """``voxelflow predict --resend [DEST]``: send the pending results (those meant for DEST when given)."""
    from voxelflow.core.db import connect

    settings = settings or Settings()
    report = resend(connect(settings.database), settings, destination)
    echo(describe(report), highlight=False)
    return report


def deliver(db: Database, settings: Settings, pipeline: str, report: Any) -> SendReport | None:
    """What a triggered prediction does after predicting, when ``VOXELFLOW_DICOM_DESTINATION`` is set: send
    the pipeline's pending results there again, then this run's new ones (None when it is not set)."""
    if not settings.dicom_destination:
        return None
    dest = Destination.parse(settings.dicom_destination)
    out = resend(db, settings, dest, pipeline)
    out.destination = str(dest)
    if report.version is not None:
        out.merge(send_results(db, settings, dest, pipeline, report.model, str(report.version),
                               results_of(report.predicted)))
    return out
