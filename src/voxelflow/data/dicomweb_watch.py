"""Watching a DICOMweb server (a PACS) for new series: QIDO-RS to find them, WADO-RS to fetch them into the spool.

``voxelflow watch dicomweb+http://host/dicom-web`` (or ``dicomweb+https://``) runs a
:class:`DicomwebWatcher`. QIDO-RS has no "added since" query, so each poll lists the server's series
with their instance counts and compares them with the cursor (table ``cursors``): the series seen
before, keyed by the hashes of their study and series UIDs, with the instance count each had when it
was fetched, and the spool objects announced. A series that is new, or whose count changed, is fetched
once its count stayed the same for ``settle_s``: its instances are retrieved one at a time (WADO-RS,
dicomweb-client), staged and moved into the spool as ``voxelflow receive`` does
(:mod:`voxelflow.data.spool`: named by content hash, grouped by hashed study and series) and announced
as ``voxelflow.data.arrived`` with the receiver's payload, event id and cursor semantics. The cursor is
written after ``emit`` returned: a restart neither announces a series again nor misses one that arrived
while it was down, and a crash between the two announces it again under the same event id.

Credentials come from the settings (``dicomweb_username`` and ``dicomweb_password``, or
``dicomweb_token``; ``dicomweb_ca``), never from the URL: one that carries them is refused. No UID or
other value of the series is logged, recorded or announced; only hashes are.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from voxelflow.core import redact
from voxelflow.core.db import Database
from voxelflow.data.spool import Spool, hashed
from voxelflow.data.watch import Arrival, get_cursor, run_steps, set_cursor

SCHEMES = ("dicomweb+http", "dicomweb+https")
STAGING = ".incoming-dicomweb"  # under the spool: instances being fetched wait here until their series is whole
_STUDY, _SERIES, _COUNT = "0020000D", "0020000E", "00201209"


def http_root(url: str) -> str:
    """The ``http(s)://`` root of a ``dicomweb+http(s)://host[:port]/path`` URL; ValueError for any other."""
    try:
        parts = urlsplit((url or "").strip())
        parts.port  # noqa: B018 - raises for a bad port
    except ValueError:
        raise ValueError(f"{redact.redact(url)!r} has a bad port") from None
    if parts.scheme.lower() not in SCHEMES or not parts.hostname:
        raise ValueError(f"a DICOMweb source is dicomweb+http(s)://host/path, not {redact.redact(url)!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError("a DICOMweb URL carries no credentials: set VOXELFLOW_DICOMWEB_USERNAME and "
                         "VOXELFLOW_DICOMWEB_PASSWORD, or VOXELFLOW_DICOMWEB_TOKEN")
    if parts.query or parts.fragment:
        raise ValueError(f"a DICOMweb URL has no query or fragment, not {redact.redact(url)!r}")
    return f"{parts.scheme.lower().removeprefix('dicomweb+')}://{parts.netloc}{parts.path.rstrip('/')}"


def client(settings: Any, root: str, timeout: float | None = None):
    """A dicomweb-client for the DICOMweb ``root`` (``http(s)://...``) with the settings' credentials and CA;
    its own retries are off (callers retry on transient errors only)."""
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session

    session = create_session()
    if settings.dicomweb_token is not None:
        session.headers["Authorization"] = f"Bearer {settings.dicomweb_token.get_secret_value()}"
    elif settings.dicomweb_username:
        password = settings.dicomweb_password.get_secret_value() if settings.dicomweb_password else ""
        session.auth = (settings.dicomweb_username, password)
    if settings.dicomweb_ca:
        session.verify = settings.dicomweb_ca
    web = DICOMwebClient(url=root, session=session, timeout=timeout or settings.dicom_send_timeout_s)
    web.set_http_retry_params(retry=False)
    return web


class DicomwebError(ConnectionError):
    """A DICOMweb request that failed, said without its URL (which names UIDs); ``transient`` as classified."""

    def __init__(self, message: str, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


@contextlib.contextmanager
def _said_plainly(what: str) -> Iterator[None]:
    import requests

    from voxelflow.core.transient import is_transient

    try:
        yield
    except requests.RequestException as exc:
        response = getattr(exc, "response", None)
        code = f" (HTTP {response.status_code})" if response is not None else ""
        raise DicomwebError(f"{what} failed: {type(exc).__name__}{code}", is_transient(exc)) from None


def _value(item: dict, tag: str) -> Any:
    values = (item.get(tag) or {}).get("Value") or [None]
    return values[0]


@dataclass(frozen=True)
class _Series:
    study_uid: str
    series_uid: str
    count: int

    @property
    def key(self) -> str:  # what the cursor and the spool know of it
        return f"{hashed(self.study_uid)}/{hashed(self.series_uid)}"


class DicomwebWatcher:
    """Polls the DICOMweb server at ``source`` for the pipeline ``name``; see the module's doc."""

    def __init__(self, source: str, db: Database, name: str, spool: Spool, emit: Callable[[Arrival], None],
                 settings: Any, settle_s: float = 2.0, poll_s: float = 2.0) -> None:
        self.root = http_root(source)
        self.source = f"dicomweb+{self.root}"
        self.db, self.spool, self.emit = db, spool, emit
        self.settle_s, self.poll_s = settle_s, poll_s
        self.cursor = f"watch:{name}:{self.source}"
        self.web = client(settings, self.root)
        state = get_cursor(db, self.cursor) or {}
        self.seen: dict[str, int] = dict(state.get("series", {}))  # hashed study/series -> instances fetched
        self.announced: dict[str, str] = dict(state.get("announced", {}))  # spool key -> content hash
        self._waiting: dict[str, tuple[int, float]] = {}  # series key -> (count, since when it is that)

    def _save(self) -> None:
        set_cursor(self.db, self.cursor, {"series": self.seen, "announced": self.announced})

    def listing(self) -> list[_Series]:
        """Every series the server holds (QIDO-RS, all pages) with its instance count."""
        with _said_plainly(f"listing the series of {self.source} (QIDO-RS)"):
            found = self.web.search_for_series(fields=["NumberOfSeriesRelatedInstances"], get_remaining=True)
        out = []
        for item in found:
            study, series = _value(item, _STUDY), _value(item, _SERIES)
            if study and series:
                out.append(_Series(str(study), str(series), int(_value(item, _COUNT) or 0)))
        return out

    def step(self, at: float | None = None) -> list[Arrival]:
        """Poll once; fetch and announce each series that is new or changed and has settled."""
        at = time.monotonic() if at is None else at
        due = []
        listed = self.listing()
        for series in listed:
            if self.seen.get(series.key) == series.count:
                self._waiting.pop(series.key, None)
                continue
            count, since = self._waiting.get(series.key, (None, at))
            if count != series.count:
                self._waiting[series.key] = (series.count, at)
                since = at
            if at - since >= self.settle_s:
                due.append(series)
        listed_keys = {s.key for s in listed}
        for key in [k for k in self._waiting if k not in listed_keys]:  # deleted from the server meanwhile
            del self._waiting[key]
        return [arrival for series in due if (arrival := self._take(series)) is not None]

    def _take(self, series: _Series) -> Arrival | None:
        association = "w" + hashlib.sha256(series.key.encode()).hexdigest()[:32]
        self.spool.drop(association)  # what an interrupted fetch of this series left
        self.spool.tmp.mkdir(parents=True, exist_ok=True)
        staged = []
        try:
            with _said_plainly(f"fetching a series from {self.source} (WADO-RS)"):
                for i, ds in enumerate(self.web.iter_series(series.study_uid, series.series_uid)):
                    path = self.spool.tmp / f"{association}-{i}.dcm"
                    ds.save_as(path, enforce_file_format=True)
                    staged.append(self.spool.stage(path, association))
            self.spool.commit(staged)
        finally:
            self.spool.drop(association)
            for left in self.spool.tmp.glob(f"{association}-*.dcm"):  # an instance whose fetch broke off
                left.unlink(missing_ok=True)
        key = self.spool.series_key(*series.key.split("/"))
        arrival = self.spool.announce(key, self.announced, self.cursor, self.emit)
        self.seen[series.key] = series.count
        self._waiting.pop(series.key, None)
        self._save()
        return arrival

    def run(self, stop: threading.Event, on_error: Callable[[Exception], None] | None = None) -> None:
        """Until ``stop`` is set: poll every ``poll_s``. A poll that fails (the server or the event API is
        away) raises, or with ``on_error`` is reported to it and tried again at the next poll: what was
        not announced is fetched and announced then."""
        report = None if on_error is None else (lambda exc: on_error(redact.scrub(exc)))
        run_steps(stop, self.step, report, pause_s=lambda: self.poll_s, retry_s=self.poll_s)


def dicomweb_spool(store_url: str, pipeline: str, home: str | Path) -> Spool:
    """The spool of ``pipeline`` with the watcher's own staging folder (beside the receiver's, never its)."""
    from voxelflow.core.storage import Store

    store = Store(store_url)
    staging = store.path(f"spool/{STAGING}") if store.local else Path(home) / "spool-incoming-dicomweb"
    return Spool(store, pipeline, staging)
