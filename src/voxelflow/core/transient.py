"""Which errors a retry can fix: the one classifier every retried step uses.

Transient: the network (refused, reset, timed out), storage (S3 5xx and throttling, I/O errors), a
server's 5xx or 429 (MLflow, the Kubernetes API, HTTP), and the database's serialisation failures,
deadlocks, lock timeouts and lost connections. Everything else fails at once with its reason: bad
data, a spec error, a missing file or key, a permission refused, a full disk and running out of
memory are the same on the next attempt.

The whole exception chain is read (``raise ... from``, and errors raised while handling another), so
a wrapper such as s3fs's ``OSError`` is judged by the boto error inside it. Library types are
recognised only when their library is already imported: this module imports none of them.
"""

from __future__ import annotations

import errno
import gzip
import sys
from collections.abc import Iterator

# errno values of trouble that passes: the network, a busy or stale resource, an interrupted call
_TRANSIENT_ERRNO = {errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                    errno.ECONNABORTED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.ENETRESET,
                    errno.EPIPE, errno.ESTALE, errno.EINTR, errno.EHOSTDOWN, errno.EREMOTEIO}
# ... and of trouble a person has to fix
_LASTING_ERRNO = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EISDIR,
                  errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.EINVAL, errno.ENOMEM}
# S3 error codes that a later attempt may not meet
_S3_TRANSIENT = {"Throttling", "ThrottlingException", "SlowDown", "RequestTimeout", "RequestTimeoutException",
                 "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequestsException",
                 "ProvisionedThroughputExceededException", "BandwidthLimitExceeded"}
# MLflow's error codes for a server in trouble
_MLFLOW_TRANSIENT = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}
# SQLSTATEs: connection exceptions (class 08), serialisation failure, deadlock, lock timeout, shutdown,
# too many connections
_SQLSTATE_TRANSIENT = {"40001", "40P01", "55P03", "57P01", "57P02", "57P03", "53300", "57014"}
_SQLITE_BUSY = ("database is locked", "database table is locked", "database is busy")


def is_transient(exc: BaseException) -> bool:
    """Whether another attempt of the work that raised ``exc`` may succeed."""
    weak = False  # an I/O error with nothing more specific behind it: storage trouble, worth a retry
    for error in _chain(exc):
        verdict = _verdict(error)
        if verdict == "weak":
            weak = True
        elif verdict is not None:
            return verdict
    return weak


def reason(exc: BaseException) -> str:
    """``ExcType: message``, for a log line that says why a retry was or was not made."""
    from voxelflow.core.redact import redact

    return redact(f"{type(exc).__name__}: {exc}")[:500]


def _chain(exc: BaseException, depth: int = 12) -> Iterator[BaseException]:
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen and len(seen) < depth:
        seen.add(id(error))
        yield error
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)


def _verdict(e: BaseException) -> bool | str | None:
    """True or False when ``e`` decides; "weak" for a generic I/O error; None to look further down."""
    flag = getattr(e, "transient", None)  # an error that knows (voxelflow's RankFailed)
    if isinstance(flag, bool):
        return flag
    if isinstance(e, MemoryError):
        return False
    if isinstance(e, RuntimeError) and "out of memory" in str(e).lower():  # torch's CUDA/CPU allocators
        return False
    for check in (_http, _boto, _sql, _mlflow, _kubernetes):
        verdict = check(e)
        if verdict is not None:
            return verdict
    if isinstance(e, gzip.BadGzipFile):  # an OSError, but the bytes are what they are
        return False
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)):
        return False
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    if isinstance(e, OSError):
        if e.errno in _LASTING_ERRNO:
            return False
        if e.__cause__ is not None:  # a wrapper (s3fs, fsspec): what it wraps decides, else its errno
            return "weak" if e.errno in _TRANSIENT_ERRNO or e.errno in (None, errno.EIO) else None
        if e.errno in _TRANSIENT_ERRNO:
            return True
        return "weak" if e.errno in (None, errno.EIO) else False
    return None


def _loaded(module: str):
    return sys.modules.get(module)


def _status_says(status: object) -> bool | None:
    return (status >= 500 or status == 429) if isinstance(status, int) else None


def _http(e: BaseException) -> bool | None:
    httpx = _loaded("httpx")
    if httpx is not None:
        if isinstance(e, httpx.TransportError):
            return True
        if isinstance(e, httpx.HTTPStatusError):
            return bool(_status_says(e.response.status_code))
    requests = _loaded("requests")
    if requests is not None:
        if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return True
        if isinstance(e, requests.exceptions.HTTPError):
            return bool(_status_says(getattr(e.response, "status_code", None)))
        if isinstance(e, requests.exceptions.RequestException):
            return None
    aiohttp = _loaded("aiohttp")
    if aiohttp is not None:
        if isinstance(e, aiohttp.ClientResponseError):
            return bool(_status_says(e.status))
        if isinstance(e, (aiohttp.ClientConnectionError, aiohttp.ServerTimeoutError)):
            return True
    return None


def _boto(e: BaseException) -> bool | None:
    exceptions = getattr(_loaded("botocore"), "exceptions", None)
    if exceptions is None:
        return None
    if isinstance(e, exceptions.ClientError):
        error = e.response.get("Error", {})
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return error.get("Code") in _S3_TRANSIENT or bool(_status_says(status))
    if isinstance(e, (exceptions.ConnectionError, exceptions.HTTPClientError)):
        return True  # endpoint unreachable, connection closed, read or connect timeout
    if isinstance(e, exceptions.BotoCoreError):
        return False  # no credentials, a bad parameter, ...
    return None


def _sql(e: BaseException) -> bool | None:
    sqlalchemy = _loaded("sqlalchemy")
    if sqlalchemy is None:
        return None
    exc = sqlalchemy.exc
    if isinstance(e, exc.TimeoutError):  # no connection free in the pool in time
        return True
    if isinstance(e, exc.DBAPIError):
        if e.connection_invalidated:
            return True
        state = getattr(e.orig, "sqlstate", None) or getattr(e.orig, "pgcode", None)
        if isinstance(state, str):
            return state in _SQLSTATE_TRANSIENT or state.startswith("08")
        text = str(e.orig).lower()
        return any(busy in text for busy in _SQLITE_BUSY) or (
            isinstance(e, exc.OperationalError) and "unable to open database" not in text
            and any(w in text for w in ("connection", "server closed", "timeout")))
    if isinstance(e, exc.SQLAlchemyError):
        return False
    return None


def _mlflow(e: BaseException) -> bool | None:
    exceptions = getattr(_loaded("mlflow"), "exceptions", None)
    if exceptions is None or not isinstance(e, exceptions.MlflowException):
        return None
    if getattr(e, "error_code", "") in _MLFLOW_TRANSIENT:
        return True
    status = getattr(e, "get_http_status_code", lambda: None)()
    if isinstance(status, int) and status >= 500 and getattr(e, "error_code", "") == "INTERNAL_ERROR":
        return True
    # the REST client reports a server it could not reach as an MlflowException naming the failure
    text = str(e).lower()
    if any(w in text for w in ("max retries exceeded", "connection refused", "timed out", *_SQLITE_BUSY)):
        return True
    return None if e.__cause__ is not None else False


def _kubernetes(e: BaseException) -> bool | None:
    module = type(e).__module__ or ""
    if not module.startswith("kubernetes.") or type(e).__name__ != "ApiException":
        return None
    status = getattr(e, "status", None)
    return isinstance(status, int) and (status >= 500 or status in (409, 429))
