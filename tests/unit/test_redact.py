"""redact masks credentials in URLs wherever they sit in a text."""
import pytest

from voxelflow.redact import redact, redact_exc


@pytest.mark.parametrize(("text", "expected"), [
    ("postgresql+psycopg://vf:hunter2@db:5432/vf", "postgresql+psycopg://vf:***@db:5432/vf"),
    ("connect failed: postgresql://vf:s3cr%40t@db/vf (timeout)", "connect failed: postgresql://vf:***@db/vf (timeout)"),
    ("API request to http://u:p@ss@mlflow:5000/api/2.0 failed", "API request to http://u:***@mlflow:5000/api/2.0 failed"),
    ("redis://:pw@cache:6379/0", "redis://:***@cache:6379/0"),
    ("https://ghp_abcdefghijklmnopqrstu@github.com/o/r", "https://***@github.com/o/r"),
    ("s3://b/k?X-Amz-Signature=abc123&part=1", "s3://b/k?X-Amz-Signature=***&part=1"),
    ("http://h/x?token=t0k&password=pw&n=2", "http://h/x?token=***&password=***&n=2"),
    ("db_password=hunter2 was rejected", "db_password=*** was rejected"),
])
def test_credentials_masked(text, expected):
    assert redact(text) == expected


@pytest.mark.parametrize("text", [
    "http://mlflow:5000/api/2.0/mlflow/runs/get and mail a@b.c",
    "sqlite:////var/lib/voxelflow/voxelflow.db",
    "file:///data/a:b@c",
    "s3://bucket/prefix/case-1.zarr",
    "",
])
def test_text_without_credentials_unchanged(text):
    assert redact(text) == text


def test_exception_text_redacted():
    exc = ConnectionError("could not connect to postgresql://vf:hunter2@db/vf")
    assert redact_exc(exc) == "ConnectionError: could not connect to postgresql://vf:***@db/vf"
