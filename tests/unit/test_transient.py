"""The retry classifier, one class of error at a time, each raised for real where it can be: a closed
port, a local HTTP server, SQLite and PostgreSQL locks, an MLflow that is not there, bad files, a
failed allocation. Only transient errors (network, storage, 5xx, database serialisation and lock
timeouts) are worth a retry."""

from __future__ import annotations

import errno
import gzip
import http.server
import os
import socket
import sqlite3
import threading

import pytest

from voxelflow.core.transient import is_transient


def raised(fn) -> BaseException:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - the error under test
        return exc
    raise AssertionError("expected an error")


_HELD: list[socket.socket] = []


def closed_port() -> int:
    """A loopback port that refuses connections for as long as the tests run: bound and never listened
    on, so no other server of the suite can take it meanwhile."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    _HELD.append(s)
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def http_server():
    """A loopback server answering GET /STATUS with that status code."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            self.send_response(int(self.path.strip("/")))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


# -- the network ---------------------------------------------------------------------------------------

def test_a_refused_connection_is_transient():
    assert is_transient(raised(lambda: socket.create_connection(("127.0.0.1", closed_port()), timeout=2)))


def test_httpx_transport_errors_and_5xx_are_transient_4xx_are_not(http_server):
    import httpx

    assert is_transient(raised(lambda: httpx.get(f"http://127.0.0.1:{closed_port()}/", timeout=2)))
    for status, transient in ((503, True), (500, True), (429, True), (404, False), (400, False), (401, False)):
        exc = raised(lambda s=status: httpx.get(f"{http_server}/{s}", timeout=5).raise_for_status())
        assert is_transient(exc) is transient, status


def test_requests_errors_by_status(http_server):
    import requests

    assert is_transient(raised(lambda: requests.get(f"http://127.0.0.1:{closed_port()}/", timeout=2)))
    assert is_transient(raised(lambda: requests.get(f"{http_server}/502", timeout=5).raise_for_status()))
    assert not is_transient(raised(lambda: requests.get(f"{http_server}/403", timeout=5).raise_for_status()))


# -- storage ---------------------------------------------------------------------------------------------

def test_missing_files_permissions_and_a_full_disk_are_not_transient(tmp_path):
    assert not is_transient(raised(lambda: open(tmp_path / "absent.nii.gz", "rb")))
    assert not is_transient(raised(lambda: open(tmp_path, "rb")))  # a folder
    assert not is_transient(OSError(errno.ENOSPC, "No space left on device"))
    assert is_transient(OSError(errno.EIO, "Input/output error"))
    assert is_transient(OSError(errno.ESTALE, "Stale file handle"))


def test_s3_errors_are_judged_by_the_boto_error_inside_s3fs_wrapper():
    from botocore.exceptions import ClientError, EndpointConnectionError
    from s3fs.errors import translate_boto_error

    def client_error(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": code},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    assert is_transient(translate_boto_error(client_error("SlowDown", 503)))
    assert is_transient(translate_boto_error(client_error("InternalError", 500)))
    assert not is_transient(translate_boto_error(client_error("NoSuchKey", 404)))  # FileNotFoundError
    assert not is_transient(translate_boto_error(client_error("AccessDenied", 403)))  # PermissionError
    # an unknown code becomes OSError(EIO) in s3fs: the 400 inside decides, not the EIO outside
    assert not is_transient(translate_boto_error(client_error("InvalidArgument", 400)))
    assert is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))


def test_an_s3_endpoint_that_is_not_there_is_transient():
    import s3fs

    fs = s3fs.S3FileSystem(key="k", secret="s", client_kwargs={"endpoint_url": f"http://127.0.0.1:{closed_port()}"},
                           config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 1})
    assert is_transient(raised(lambda: fs.cat("bucket/key")))


# -- the database ----------------------------------------------------------------------------------------

def test_a_locked_sqlite_database_is_transient_a_constraint_is_not(tmp_path):
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import IntegrityError, OperationalError

    path = tmp_path / "db.sqlite"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("create table t (k integer primary key)")
    holder.execute("begin immediate")
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0})
    try:
        with pytest.raises(OperationalError) as locked:
            with engine.begin() as conn:
                conn.execute(text("insert into t values (1)"))
        assert is_transient(locked.value)
        holder.execute("rollback")
        with engine.begin() as conn:
            conn.execute(text("insert into t values (1)"))
        with pytest.raises(IntegrityError) as duplicate:
            with engine.begin() as conn:
                conn.execute(text("insert into t values (1)"))
        assert not is_transient(duplicate.value)
    finally:
        holder.close()
        engine.dispose()


@pytest.fixture
def postgres():
    admin = os.environ.get("VOXELFLOW_TEST_DATABASE_URL")
    if not admin:
        pytest.skip("VOXELFLOW_TEST_DATABASE_URL is not set (make test sets it where PostgreSQL runs)")
    from tests.services import fresh_postgres

    with fresh_postgres(admin) as url:
        yield url


def test_postgres_serialisation_failures_and_lock_timeouts_are_transient(postgres):
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import DBAPIError

    engine = create_engine(postgres)
    with engine.begin() as conn:
        conn.execute(text("create table t (k integer primary key, v integer)"))
        conn.execute(text("insert into t values (1, 0)"))
    a, b = engine.connect(), engine.connect()
    try:
        # lock timeout: b waits on a's row lock for 20 ms
        ta = a.begin()
        a.execute(text("update t set v = 1 where k = 1"))
        tb = b.begin()
        b.execute(text("set local lock_timeout = '20ms'"))
        with pytest.raises(DBAPIError) as timeout:
            b.execute(text("update t set v = 2 where k = 1"))
        assert timeout.value.orig.sqlstate == "55P03" and is_transient(timeout.value)
        tb.rollback()
        ta.rollback()
        # serialisation failure: two serializable transactions write what the other read
        ta, tb = a.begin(), b.begin()
        for conn in (a, b):
            conn.execute(text("set transaction isolation level serializable"))
            conn.execute(text("select sum(v) from t"))
        a.execute(text("insert into t values (2, 1)"))
        b.execute(text("insert into t values (3, 1)"))
        ta.commit()
        with pytest.raises(DBAPIError) as conflict:
            tb.commit()
        assert conflict.value.orig.sqlstate == "40001" and is_transient(conflict.value)
        # a constraint is the data's fault
        with pytest.raises(DBAPIError) as duplicate, a.begin():
            a.execute(text("insert into t values (1, 5)"))
        assert not is_transient(duplicate.value)
    finally:
        a.close()
        b.close()
        engine.dispose()


def test_a_database_server_that_is_not_there_is_transient():
    from sqlalchemy import create_engine, text

    engine = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/x",
                           connect_args={"connect_timeout": 2})
    assert is_transient(raised(lambda: engine.connect().execute(text("select 1"))))


# -- MLflow ----------------------------------------------------------------------------------------------

def test_an_mlflow_server_that_is_not_there_is_transient_a_missing_model_is_not(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    away_uri = f"http://127.0.0.1:{closed_port()}"
    away = MlflowClient(tracking_uri=away_uri, registry_uri=away_uri)  # not the process's registry URI
    assert is_transient(raised(lambda: away.get_registered_model("m")))
    here_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    here = MlflowClient(tracking_uri=here_uri, registry_uri=here_uri)
    assert not is_transient(raised(lambda: here.get_registered_model("never-registered")))


# -- bad data, spec errors, a missing key, memory ----------------------------------------------------------

def test_bad_data_spec_errors_and_a_missing_key_are_not_transient(tmp_path):
    import nibabel as nib
    import numpy as np

    from voxelflow.data.formats import VolumeError, read_nifti
    from voxelflow.spec.config import load_spec

    assert not is_transient(raised(lambda: gzip.decompress(b"not gzip at all")))  # BadGzipFile is an OSError
    truncated = tmp_path / "cut.nii"
    nib.save(nib.Nifti1Image(np.ones((32, 32, 32), np.float32), np.eye(4)), truncated)
    truncated.write_bytes(truncated.read_bytes()[:4000])
    exc = raised(lambda: read_nifti(truncated.read_bytes(), truncated.name, 10**9))
    assert isinstance(exc, (VolumeError, ValueError)) and not is_transient(exc)
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: x\ndata: {source: /nowhere}\ntrain: {epochs: many}\n")
    assert not is_transient(raised(lambda: load_spec(spec)))
    key_missing = ValueError("a DICOM ingest needs a de-identification key: set VOXELFLOW_DEID_KEY")
    assert not is_transient(key_missing)


def test_running_out_of_memory_is_not_transient():
    import numpy as np
    import torch

    assert not is_transient(raised(lambda: np.empty(2**62, dtype=np.uint8)))
    assert not is_transient(raised(lambda: torch.empty(2**62, dtype=torch.uint8)))


def test_the_chain_is_read_through_wrappers():
    try:
        try:
            socket.create_connection(("127.0.0.1", closed_port()), timeout=2)
        except OSError as inner:
            raise RuntimeError("could not write the checkpoint") from inner
    except RuntimeError as outer:
        assert is_transient(outer)
    assert not is_transient(RuntimeError("a bug"))
