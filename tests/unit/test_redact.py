"""redact masks credentials in URLs wherever they sit in a text."""
import pytest

from voxelflow.core.redact import redact, redact_exc


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


def test_settings_keep_database_and_tracking_urls_secret(monkeypatch, tmp_path):
    from voxelflow.spec.config import Settings

    monkeypatch.setenv("VOXELFLOW_DATABASE_URL", "postgresql+psycopg://vf:dbpass123@db.example/vf")
    monkeypatch.setenv("VOXELFLOW_MLFLOW_TRACKING_URI", "https://ml:mlpass456@mlflow.example")
    settings = Settings(home=tmp_path)
    shown = f"{settings!r} {settings} {settings.model_dump()} {settings.model_dump_json()}"
    assert "dbpass123" not in shown and "mlpass456" not in shown
    # code that connects still gets the plain URLs
    assert settings.database == "postgresql+psycopg://vf:dbpass123@db.example/vf"
    assert settings.tracking_uri == "https://ml:mlpass456@mlflow.example"
    assert Settings(home=tmp_path, database_url="sqlite:///{home}/x.db").database == f"sqlite:///{tmp_path.resolve()}/x.db"


def test_scrub_masks_the_whole_chain_in_place_and_keeps_types():
    import traceback

    from voxelflow.core.redact import scrub

    inner_secret, outer_secret = "inner-" + "secret", "outer-" + "secret"  # not spelled out in the traceback's source
    try:
        try:
            raise OSError(f"PUT https://u:{inner_secret}@store.example/k failed")
        except OSError as inner:
            raise RuntimeError(f"API request to http://vf:{outer_secret}@mlflow:5000/api failed") from inner
    except RuntimeError as exc:
        caught = scrub(exc)
    text = "".join(traceback.format_exception(caught))
    assert inner_secret not in text and outer_secret not in text and "u:***@store.example" in text
    assert isinstance(caught, RuntimeError) and isinstance(caught.__cause__, OSError)


def test_log_filter_masks_messages_and_tracebacks():
    import logging

    from voxelflow.core.redact import RedactingFilter

    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "cannot reach %s", ("redis://:pw123@cache:6379",),
                               None)
    assert RedactingFilter().filter(record) and record.getMessage() == "cannot reach redis://:***@cache:6379"
