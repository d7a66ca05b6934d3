"""The steps voxelflow ships, on real cases in a real store, a real MLflow registry and a real HTTP server."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from voxelflow.core.storage import Layout, Store
from voxelflow.core.transient import is_transient
from voxelflow.data.ingest import load_case, write_case
from voxelflow.data.preprocess import case_dataset
from voxelflow.spec.config import Settings
from voxelflow.steps import StepContext, StepInputs, intensity_stats, label_volume_check, notify_webhook, outputs

DIGEST = "d" * 16


def affine_of(mm: float) -> np.ndarray:
    return np.diag([mm, mm, mm, 1.0])


def raw_case(layout: Layout, cid: str, label: np.ndarray | None, mm: float = 1.0) -> None:
    """A case as ingestion stores it: image and label (x, y, z), the affine in the attributes."""
    from voxelflow.data.formats import Volume

    shape = label.shape if label is not None else (4, 4, 4)
    image = Volume(np.zeros(shape, np.float32), affine_of(mm), (mm,) * 3)
    write_case(layout.raw, cid, image, label, {"affine": affine_of(mm).tolist(), "spacing": [mm] * 3})


def labelled(voxels: dict[int, int], shape: tuple[int, int, int] = (6, 6, 6)) -> np.ndarray:
    """A label with ``voxels[c]`` voxels of class c."""
    flat = np.zeros(int(np.prod(shape)), np.uint8)
    at = 0
    for c, n in voxels.items():
        flat[at:at + n] = c
        at += n
    return flat.reshape(shape)


def context(layout: Layout, case_ids: list[str], step_id: str = "qc", settings: Settings | None = None,
            **inputs) -> StepContext:
    return StepContext(StepInputs(pipeline=layout.pipeline, step_id=step_id, case_ids=case_ids, **inputs),
                       layout.store, settings or Settings(home=Path(str(layout.store.url)).parent / "home"))


@pytest.fixture
def layout(tmp_path) -> Layout:
    return Layout(Store(tmp_path / "store"), "p")


# ---------------------------------------------------------------- label_volume_check


def test_volumes_within_bounds_pass_with_their_range_and_artifact(layout):
    raw_case(layout, "a", labelled({1: 30, 2: 5}))
    raw_case(layout, "b", labelled({1: 40, 2: 8}))
    result = label_volume_check(context(layout, ["a", "b"]), min_ml=0.004, max_ml=0.05)
    assert result.passed, result.reason
    assert result.metrics == {"cases": 2, "outliers": 0, "min_ml_seen": pytest.approx(0.005),
                              "max_ml_seen": pytest.approx(0.040)}
    volumes = json.loads(Path(result.artifacts["label_volumes.json"]).read_text())
    assert volumes == {"a": {"1": pytest.approx(0.030), "2": pytest.approx(0.005)},
                       "b": {"1": pytest.approx(0.040), "2": pytest.approx(0.008)}}
    assert set(result.metrics) <= set(outputs(label_volume_check))


def test_outliers_are_named_sorted_with_their_volumes_and_an_absent_class_is_zero(layout):
    raw_case(layout, "c-small", labelled({1: 2, 2: 10}))
    raw_case(layout, "a-fine", labelled({1: 10, 2: 10}))
    raw_case(layout, "b-nolesion", labelled({1: 12}))  # class 2 absent: 0 mL, below the bound
    raw_case(layout, "d-big", labelled({1: 100, 2: 10}))
    result = label_volume_check(context(layout, ["c-small", "a-fine", "b-nolesion", "d-big"]),
                                min_ml=0.005, max_ml=0.05)
    assert not result.passed
    assert result.metrics["outliers"] == 3 and result.metrics["cases"] == 4
    assert result.metrics["min_ml_seen"] == 0.0 and result.metrics["max_ml_seen"] == pytest.approx(0.1)
    assert result.reason.startswith("3 of 4 cases outside [0.005, 0.05] mL: ")
    assert result.reason.index("b-nolesion") < result.reason.index("c-small") < result.reason.index("d-big")
    assert "a-fine" not in result.reason
    assert "b-nolesion (class 2: 0.0 mL)" in result.reason
    assert "c-small (class 1: 0.002 mL)" in result.reason and "d-big (class 1: 0.1 mL)" in result.reason

    only_one = label_volume_check(context(layout, ["c-small", "a-fine", "b-nolesion", "d-big"]),
                                  min_ml=0.005, max_ml=0.05, classes=[1])  # class 2 not checked
    assert only_one.metrics["outliers"] == 2 and "b-nolesion" not in only_one.reason


def test_a_voxel_of_2_mm_holds_8_times_the_millilitres(layout):
    raw_case(layout, "one", labelled({1: 50}), mm=1.0)
    raw_case(layout, "two", labelled({1: 50}), mm=2.0)
    result = label_volume_check(context(layout, ["one", "two"]), max_ml=0.2)
    volumes = json.loads(Path(result.artifacts["label_volumes.json"]).read_text())
    assert volumes["one"]["1"] == pytest.approx(0.050) and volumes["two"]["1"] == pytest.approx(0.400)
    assert result.metrics["outliers"] == 1 and "two (class 1: 0.4 mL)" in result.reason


def test_more_than_ten_outliers_are_cut_short(layout):
    ids = [f"case-{i:02d}" for i in range(13)]
    for cid in ids:
        raw_case(layout, cid, labelled({1: 3}, (2, 2, 2)))
    result = label_volume_check(context(layout, ids), min_ml=1.0)
    assert result.metrics["outliers"] == 13
    assert "case-09" in result.reason and "case-10" not in result.reason and result.reason.endswith("and 3 more")


def test_a_case_without_label_is_an_error_naming_it(layout):
    raw_case(layout, "ok", labelled({1: 3}))
    raw_case(layout, "bare", None)
    with pytest.raises(ValueError, match="case bare has no label"):
        label_volume_check(context(layout, ["ok", "bare"]))


def test_bad_bounds_are_errors_naming_the_key(layout):
    with pytest.raises(ValueError, match="max_ml"):
        label_volume_check(context(layout, []), min_ml=5.0, max_ml=1.0)
    with pytest.raises(ValueError, match="classes"):
        label_volume_check(context(layout, []), classes=[0])


def test_volumes_of_ingested_cases_follow_their_labels_and_affines(ingested):
    ingested_layout, report = ingested
    result = label_volume_check(context(ingested_layout, report.case_ids))
    volumes = json.loads(Path(result.artifacts["label_volumes.json"]).read_text())
    for cid in report.case_ids:
        case = load_case(ingested_layout.raw, cid)
        ml = abs(np.linalg.det(case["affine"][:3, :3])) / 1000.0
        counts = np.bincount(case["label"].ravel())
        assert volumes[cid] == {str(c): pytest.approx(counts[c] * ml, rel=1e-12) for c in range(1, len(counts))
                                if any(np.any(load_case(ingested_layout.raw, o)["label"] == c)
                                       for o in report.case_ids)}
    assert result.passed and result.metrics["cases"] == len(report.case_ids)


# ---------------------------------------------------------------- intensity_stats


def preprocessed_case(layout: Layout, cid: str, image: np.ndarray) -> None:
    """A case as preprocessing stores it: image (channel, x, y, z) float32."""
    ds = case_dataset({"image": image, "affine": affine_of(1.0)}, {"affine": affine_of(1.0).tolist()}, DIGEST)
    layout.preprocessed(DIGEST).write(cid, ds)


@pytest.fixture
def images(layout) -> dict[str, np.ndarray]:
    """Three two-channel cases of different sizes, CT-like values (offset 1000) on channel 0."""
    rng = np.random.default_rng(3)
    out = {}
    for cid, shape in (("a", (5, 6, 7)), ("b", (8, 3, 4)), ("c", (4, 4, 9))):
        image = np.stack([1000 + 40 * rng.standard_normal(shape), rng.random(shape)]).astype(np.float32)
        preprocessed_case(layout, cid, image)
        out[cid] = image
    return out


def test_intensity_stats_equal_numpys_over_all_voxels(layout, images):
    result = intensity_stats(context(layout, ["a", "b", "c"], step_id="intensity", preprocess_digest=DIGEST))
    assert result.passed and result.reason == "no champion to compare with"
    for c in range(2):
        voxels = np.concatenate([im[c].ravel().astype(np.float64) for im in images.values()])
        assert result.metrics[f"mean_c{c}"] == pytest.approx(voxels.mean(), rel=1e-9, abs=1e-12)
        assert result.metrics[f"std_c{c}"] == pytest.approx(voxels.std(), rel=1e-9, abs=1e-12)
    assert result.metrics["cases"] == 3 and result.metrics["channels"] == 2 and "drift" not in result.metrics
    assert set(result.metrics) - {"mean_c1", "std_c1"} <= set(outputs(intensity_stats))


def test_intensity_stats_need_preprocessed_cases(layout):
    with pytest.raises(ValueError, match="after preprocess"):
        intensity_stats(context(layout, ["a"]))
    with pytest.raises(ValueError, match="max_drift"):
        intensity_stats(context(layout, ["a"], preprocess_digest=DIGEST), max_drift=-1.0)


def champion_with(settings: Settings, name: str, metrics: dict[str, float]) -> str:
    """A registered version whose training run carries ``metrics``, made ``name``'s champion."""
    from voxelflow.release import registry

    uri = settings.tracking_uri
    mc = registry.client(uri)
    exp = mc.get_experiment_by_name("train") or mc.get_experiment(mc.create_experiment(
        "train", artifact_location=settings.artifact_root))
    run = mc.create_run(exp.experiment_id)
    registry.log_metrics(uri, run.info.run_id, metrics)
    if registry.alias_version(uri, name) is None and not mc.search_registered_models(f"name = '{name}'"):
        mc.create_registered_model(name)
    version = str(mc.create_model_version(name, settings.artifact_root, run_id=run.info.run_id).version)
    registry.promote(uri, name, version)
    return version


def test_drift_from_the_champions_training_set_fails_naming_the_channel(layout, images, tmp_path):
    settings = Settings(home=tmp_path / "home")
    ctx = context(layout, ["a", "b", "c"], step_id="intensity", settings=settings, preprocess_digest=DIGEST,
                  model_name="seg")
    assert intensity_stats(ctx).reason == "no champion to compare with"  # a registry without the model
    ours = intensity_stats(ctx).metrics
    same = {f"intensity.{k}": v for k, v in ours.items() if k.startswith(("mean_", "std_"))}
    version = champion_with(settings, "seg", same)
    close = intensity_stats(ctx)
    assert close.passed and close.metrics["drift"] == pytest.approx(0.0, abs=1e-9), close.reason
    assert f"champion v{version}" in close.reason

    shifted = {**same, "intensity.mean_c1": ours["mean_c1"] - 0.8 * ours["std_c1"], "intensity.std_c1": ours["std_c1"]}
    version = champion_with(settings, "seg", shifted)
    far = intensity_stats(ctx, max_drift=0.5)
    assert not far.passed and far.metrics["drift"] == pytest.approx(0.8, rel=1e-6)
    assert "channel 1" in far.reason and f"champion v{version}" in far.reason and "max_drift 0.5" in far.reason
    assert intensity_stats(ctx, max_drift=0.9).passed


def test_a_champion_without_these_statistics_is_no_comparison(layout, images, tmp_path):
    settings = Settings(home=tmp_path / "home")
    champion_with(settings, "seg", {"val_dice": 0.8})
    ctx = context(layout, ["a", "b", "c"], step_id="intensity", settings=settings, preprocess_digest=DIGEST,
                  model_name="seg")
    result = intensity_stats(ctx)
    assert result.passed and "drift" not in result.metrics and "no intensity.mean_c* metrics" in result.reason


# ---------------------------------------------------------------- notify_webhook


class Receiver:
    """A real HTTP server on loopback that records each request and answers ``status``."""

    def __init__(self, status: int = 200) -> None:
        self.status, self.requests = status, []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.requests.append((self.path, dict(self.headers), body))
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


OUTPUTS = {
    "ingest": {"new_cases": 2},
    "evaluate": {"dice": 0.81, "hd95": 4.5, "worst_case": "case-secret-1", "passed": True},
    "promote": {"promoted": True, "champion": "3", "reasons": "dice 0.81 meets the gate 0.70", "version": "3"},
    "deploy": {"endpoint": "http://serve.internal:8000", "model_version": "3", "case": "case-secret-2"},
}


def webhook_context(layout: Layout, tmp_path: Path, url: str | None, **inputs) -> StepContext:
    return context(layout, ["case-secret-1", "case-secret-2"], step_id="notify", model_name="seg",
                   settings=Settings(home=tmp_path / "home", webhook_url=url), outputs=OUTPUTS,
                   test_ids=["case-secret-2"], **inputs)


def test_webhook_posts_the_summary_without_any_case(layout, tmp_path, receiver):
    ctx = webhook_context(layout, tmp_path, f"{receiver.base}/hooks/T123/secret-path?token=abc")
    result = notify_webhook(ctx)
    assert result.metrics == {"status": 200} and set(result.metrics) <= set(outputs(notify_webhook))
    ((path, headers, raw),) = receiver.requests
    assert path == "/hooks/T123/secret-path?token=abc" and headers["Content-Type"] == "application/json"
    assert b"case-secret" not in raw and b"store" not in raw
    assert json.loads(raw) == {
        "pipeline": "p", "step": "notify", "model_name": "seg", "model_version": "3",
        "decision": {"promoted": True, "champion": "3", "reasons": "dice 0.81 meets the gate 0.70"},
        "metrics": {"dice": 0.81, "hd95": 4.5},
        "deployment": {"endpoint": "http://serve.internal:8000", "version": "3"},
    }
    notify_webhook(ctx, include_metrics=False)
    assert json.loads(receiver.requests[1][2])["metrics"] == {}


def test_a_server_error_is_transient_and_names_no_secret(layout, tmp_path, receiver, caplog):
    receiver.status = 503
    ctx = webhook_context(layout, tmp_path, f"http://hook:pa55word@127.0.0.1:{receiver.server.server_address[1]}"
                          "/hooks/T123/secret-path?token=abc")
    with pytest.raises(RuntimeError) as info:
        notify_webhook(ctx)
    assert is_transient(info.value) and "HTTP 503" in str(info.value)
    for secret in ("pa55word", "secret-path", "abc", "T123"):
        assert secret not in str(info.value) and secret not in caplog.text
    assert len(receiver.requests) == 1  # the step runner retries (retries:), not the step


def test_a_client_error_is_lasting_and_names_the_status(layout, tmp_path, receiver):
    receiver.status = 404
    with pytest.raises(RuntimeError, match="HTTP 404") as info:
        notify_webhook(webhook_context(layout, tmp_path, f"{receiver.base}/nowhere"))
    assert not is_transient(info.value)
    receiver.status = 429
    with pytest.raises(RuntimeError, match="HTTP 429") as info:
        notify_webhook(webhook_context(layout, tmp_path, f"{receiver.base}/busy"))
    assert is_transient(info.value)


def test_an_unreachable_webhook_is_transient(layout, tmp_path):
    with socket.socket() as bound:  # bound, never listening: connections are refused
        bound.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{bound.getsockname()[1]}/hooks/secret-path"
        with pytest.raises(RuntimeError, match="could not be reached") as info:
            notify_webhook(webhook_context(layout, tmp_path, url), timeout_s=2.0)
    assert is_transient(info.value) and "secret-path" not in str(info.value)


def test_an_unset_webhook_url_is_a_clear_error(layout, tmp_path, monkeypatch):
    monkeypatch.delenv("VOXELFLOW_WEBHOOK_URL", raising=False)
    unsent = notify_webhook(webhook_context(layout, tmp_path, None))  # a warning: nothing sent, said so
    assert unsent.passed is False and "VOXELFLOW_WEBHOOK_URL is not set" in unsent.reason
    with pytest.raises(ValueError, match="VOXELFLOW_WEBHOOK_URL is not set"):
        notify_webhook(webhook_context(layout, tmp_path, None), required=True)
    with pytest.raises(ValueError, match="VOXELFLOW_WEBHOOK_URL must be an http"):
        notify_webhook(webhook_context(layout, tmp_path, "ftp://example.org/x"))
    monkeypatch.setenv("VOXELFLOW_WEBHOOK_URL", "https://hooks.example.org/x?token=t")
    settings = Settings(home=tmp_path / "home")
    assert settings.webhook_url.get_secret_value() == "https://hooks.example.org/x?token=t"
    assert "token=t" not in json.dumps(StepContext(StepInputs(pipeline="p", step_id="n"), None, settings).settings)
