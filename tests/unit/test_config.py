"""The pipeline spec (DSL): loading, overlays, --set, and the errors a bad spec gives."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from voxelflow.spec.config import PipelineSpec, PreprocessSpec, Settings, SpecError, load_spec

REPO = Path(__file__).resolve().parents[2]
STAGES = ("data", "preprocess", "train", "evaluate", "promote", "deploy")


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_demo_spec_loads(demo_spec_path, demo_data):
    spec = load_spec(demo_spec_path)
    assert isinstance(spec, PipelineSpec)
    # every value written in the file survives validation (the values themselves may be tuned)
    assert spec.name == demo_data["name"]
    assert spec.data.layout == demo_data["data"]["layout"]
    assert spec.preprocess.transforms == demo_data["preprocess"]["transforms"]
    assert [next(iter(t)) for t in spec.preprocess.transforms][-1] == "ResizeWithPadOrCropd"
    assert spec.preprocess.spatial_size == tuple(
        demo_data["preprocess"]["transforms"][-1]["ResizeWithPadOrCropd"]["spatial_size"])
    assert spec.train.network == demo_data["train"]["network"]
    assert spec.train.loss == demo_data["train"]["loss"]
    assert spec.train.epochs == demo_data["train"]["epochs"]
    assert spec.train.precision == demo_data["train"]["precision"]
    assert spec.promote.gates.min_dice == pytest.approx(demo_data["promote"]["gates"]["min_dice"])
    assert spec.deploy.target == demo_data["deploy"]["target"]
    # the digest is stable across loads and changes with the content
    assert load_spec(demo_spec_path).digest() == spec.digest()
    assert load_spec(demo_spec_path, sets=[f"train.epochs={spec.train.epochs + 1}"]).digest() != spec.digest()


def test_overlay_merges_deeply(demo_spec_path, tmp_path):
    overlay = write_yaml(tmp_path / "overlay.yaml", {
        "train": {"epochs": 987},
        "promote": {"gates": {"beat_champion_by": 0.17}},
    })
    base = load_spec(demo_spec_path)
    spec = load_spec(demo_spec_path, overlays=[overlay])
    assert base.train.epochs != 987 and base.promote.gates.beat_champion_by != 0.17
    assert spec.train.epochs == 987
    # siblings of the changed keys keep the base's values
    assert spec.train.model_dump(exclude={"epochs"}) == base.train.model_dump(exclude={"epochs"})
    assert spec.promote.gates.beat_champion_by == 0.17
    assert spec.promote.gates.min_dice == base.promote.gates.min_dice
    assert spec.promote.model_dump(exclude={"gates"}) == base.promote.model_dump(exclude={"gates"})
    assert spec.model_dump(exclude={"train", "promote"}) == base.model_dump(exclude={"train", "promote"})


def test_overlays_apply_in_order_and_sets_win(demo_spec_path, tmp_path):
    first = write_yaml(tmp_path / "a.yaml", {"train": {"epochs": 5, "batch_size": 4}})
    second = write_yaml(tmp_path / "b.yaml", {"train": {"epochs": 7}})
    spec = load_spec(demo_spec_path, overlays=[first, second], sets=["train.batch_size=3"])
    assert spec.train.epochs == 7
    assert spec.train.batch_size == 3


def test_set_expression(demo_spec_path):
    base = load_spec(demo_spec_path)
    assert base.train.epochs != 3
    spec = load_spec(demo_spec_path, sets=["train.epochs=3"])
    assert spec.train.epochs == 3
    assert isinstance(spec.train.epochs, int)
    assert spec.train.model_dump(exclude={"epochs"}) == base.train.model_dump(exclude={"epochs"})
    spec = load_spec(demo_spec_path, sets=["promote.gates.min_dice=0.9", "train.precision=fp32"])
    assert spec.promote.gates.min_dice == pytest.approx(0.9)
    assert spec.promote.gates.beat_champion_by == base.promote.gates.beat_champion_by
    assert spec.train.precision == "fp32"


def test_set_without_equals_is_an_error(demo_spec_path):
    with pytest.raises(SpecError, match="key.path=value"):
        load_spec(demo_spec_path, sets=["train.epochs"])


def _mutate(data: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    node[last] = value


def _transform(data: dict, item) -> None:
    data["preprocess"]["transforms"].append(item)


# (id, how to break the spec, fragments the message must contain: key path, what was expected)
BAD_SPECS = [
    ("unknown-top-level", lambda d: d.update(bogus=1), ["bogus", "unknown key"]),
    ("unknown-nested", lambda d: _mutate(d, "train.epocs", 3), ["train.epocs", "unknown key"]),
    ("wrong-type", lambda d: _mutate(d, "train.epochs", "many"), ["train.epochs", "integer"]),
    ("unknown-transform", lambda d: _transform(d, {"NoSuchTransformd": {"keys": "image"}}),
     ["preprocess.transforms", "NoSuchTransformd", "unknown transform"]),
    ("not-dictionary-transform", lambda d: _transform(d, {"Orientation": {"axcodes": "RAS"}}),
     ["preprocess.transforms", "Orientation", "dictionary transform"]),
    ("unknown-argument", lambda d: _transform(d, {"Orientationd": {"keys": "image", "axcode": "RAS"}}),
     ["preprocess.transforms", "Orientationd", "axcode", "axcodes"]),
    ("missing-keys", lambda d: _transform(d, {"Orientationd": {"axcodes": "RAS"}}),
     ["preprocess.transforms", "Orientationd", "keys"]),
    ("unknown-network", lambda d: _mutate(d, "train.network", {"NoSuchNet": {}}),
     ["train.network", "NoSuchNet", "unknown network"]),
    ("network-argument", lambda d: _mutate(d, "train.network", {"UNet": {"spatial_dims": 3, "chanels": [4]}}),
     ["train.network", "UNet", "chanels"]),
    ("unknown-loss", lambda d: _mutate(d, "train.loss", {"NoSuchLoss": {}}),
     ["train.loss", "NoSuchLoss", "unknown loss"]),
    ("bad-precision", lambda d: _mutate(d, "train.precision", "fp8"),
     ["train.precision", "auto", "fp32", "bf16-mixed", "fp16-mixed"]),
    ("bad-cluster", lambda d: _mutate(d, "preprocess.cluster", "kubernetes"),
     ["preprocess.cluster", "tcp://"]),
    ("adaptive-order", lambda d: _mutate(d, "preprocess.adaptive", {"minimum": 3, "maximum": 2}),
     ["preprocess.adaptive", "maximum", "minimum"]),
    ("missing-section", lambda d: d.pop("train"), ["train", "required"]),
    ("bad-layout", lambda d: _mutate(d, "data.layout", "bids"), ["data.layout", "decathlon", "folder"]),
    ("bad-model-name", lambda d: _mutate(d, "promote.model_name", "has space"), ["promote.model_name"]),
    ("bad-work-pool", lambda d: _mutate(d, "train.work_pool", "gpu pool"), ["train.work_pool"]),
    ("work-pool-not-a-string", lambda d: _mutate(d, "evaluate", {"work_pool": 3}), ["evaluate.work_pool", "string"]),
    ("bad-device", lambda d: _mutate(d, "preprocess.device", "tpu"), ["preprocess.device", "cpu", "cuda"]),
    ("adaptive-order", lambda d: _mutate(d, "preprocess.adaptive", {"minimum": 3, "maximum": 2}),
     ["preprocess.adaptive", "maximum must be at least minimum"]),
    ("adaptive-negative", lambda d: _mutate(d, "preprocess.adaptive", {"minimum": -1}),
     ["preprocess.adaptive.minimum", "greater than or equal to 0"]),
    ("adaptive-zero-maximum", lambda d: _mutate(d, "preprocess.adaptive", {"maximum": 0}),
     ["preprocess.adaptive.maximum", "greater than or equal to 1"]),
    ("adaptive-unknown-key", lambda d: _mutate(d, "preprocess.adaptive", {"most": 4}),
     ["preprocess.adaptive.most", "unknown key"]),
]


@pytest.mark.parametrize("breaker, fragments", [b[1:] for b in BAD_SPECS], ids=[b[0] for b in BAD_SPECS])
def test_bad_spec_raises_spec_error_naming_file_key_and_expectation(demo_data, tmp_path, breaker, fragments):
    data = copy.deepcopy(demo_data)
    breaker(data)
    path = write_yaml(tmp_path / "broken.yaml", data)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_error_from_an_overlay_names_the_overlay(demo_spec_path, tmp_path):
    overlay = write_yaml(tmp_path / "over.yaml", {"train": {"epocs": 3}})
    with pytest.raises(SpecError) as info:
        load_spec(demo_spec_path, overlays=[overlay])
    message = str(info.value)
    assert str(overlay) in message and str(demo_spec_path) in message
    assert "train.epocs" in message


def test_error_from_a_set_names_the_set(demo_spec_path):
    with pytest.raises(SpecError) as info:
        load_spec(demo_spec_path, sets=["train.epochs=many"])
    message = str(info.value)
    assert "--set train.epochs=many" in message
    assert "train.epochs" in message


def test_file_that_is_not_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: demo\ntrain: [1, 2\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(path) in str(info.value)
    assert "not valid YAML" in str(info.value)


def test_file_that_is_a_list(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- name\n- train\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(path) in str(info.value)
    assert "mapping" in str(info.value) and "list" in str(info.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.yaml"
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(path) in str(info.value)
    assert "cannot read" in str(info.value)


def test_missing_overlay_file(demo_spec_path, tmp_path):
    path = tmp_path / "no-overlay.yaml"
    with pytest.raises(SpecError) as info:
        load_spec(demo_spec_path, overlays=[path])
    assert str(path) in str(info.value)


def test_empty_file_reports_missing_keys(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    for key in ("name", "data", "preprocess", "train", "promote"):
        assert f"{path}: {key}: required key is missing" in message


def test_array_transform_whose_name_ends_in_d_is_rejected(demo_data, tmp_path):
    _transform(demo_data, {"SpatialPad": {"keys": "image", "spatial_size": [32, 32, 32]}})
    with pytest.raises(SpecError, match="dictionary transform"):
        load_spec(write_yaml(tmp_path / "pad.yaml", demo_data))


def test_every_stage_takes_an_optional_work_pool(demo_spec_path):
    spec = load_spec(demo_spec_path)
    assert all(getattr(spec, stage).work_pool is None for stage in STAGES)  # default: the lifecycle's process
    spec = load_spec(demo_spec_path, sets=[f"{stage}.work_pool=pool-{stage}.v1_x" for stage in STAGES])
    assert {stage: getattr(spec, stage).work_pool for stage in STAGES} == {s: f"pool-{s}.v1_x" for s in STAGES}


@pytest.mark.parametrize("pool", ["", "-leading-dash", "has space", "slash/pool", "ümlaut"])
def test_bad_work_pool_names_are_refused(demo_spec_path, pool):
    with pytest.raises(SpecError, match="train.work_pool"):
        load_spec(demo_spec_path, sets=[f"train.work_pool={pool!r}"])


def test_preprocess_device_and_adaptive(demo_spec_path):
    spec = load_spec(demo_spec_path)
    assert spec.preprocess.device == "cpu" and spec.preprocess.adaptive is None
    spec = load_spec(demo_spec_path, sets=["preprocess.device=cuda", "preprocess.adaptive={minimum: 0, maximum: 6}"])
    assert spec.preprocess.device == "cuda"
    assert spec.preprocess.adaptive.model_dump() == {"minimum": 0, "maximum": 6}
    spec = load_spec(demo_spec_path, sets=["preprocess.adaptive={}"])
    assert spec.preprocess.adaptive.model_dump() == {"minimum": 1, "maximum": 4}
    spec = load_spec(demo_spec_path, sets=["preprocess.adaptive={minimum: 2, maximum: 2}"])
    assert spec.preprocess.adaptive.minimum == spec.preprocess.adaptive.maximum == 2
    direct = PreprocessSpec(transforms=spec.preprocess.transforms, device="cuda", adaptive={"maximum": 2})
    assert direct.adaptive.model_dump() == {"minimum": 1, "maximum": 2}


@pytest.mark.parametrize("overlay", sorted((REPO / "deployments" / "params").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_overlays_apply_to_the_demo_spec(demo_spec_path, overlay):
    spec = load_spec(demo_spec_path, overlays=[overlay])
    assert spec.name


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("VOXELFLOW_HOME", "VOXELFLOW_MLFLOW_TRACKING_URI", "VOXELFLOW_DASK_SCHEDULER", "VOXELFLOW_STORE",
                "VOXELFLOW_DATABASE_URL", "VOXELFLOW_MLFLOW_ARTIFACT_ROOT", "VOXELFLOW_SERVE_PORT"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_settings_tracking_uri_is_absolute_sqlite(tmp_path, clean_env):
    settings = Settings(home=tmp_path)
    uri = settings.tracking_uri
    assert uri.startswith("sqlite:////")
    assert uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert settings.artifact_root == (tmp_path.resolve() / "mlartifacts").as_uri()
    assert settings.expand("{home}/incoming") == f"{tmp_path.resolve()}/incoming"


def test_settings_relative_home_still_gives_absolute_uri(tmp_path, clean_env):
    clean_env.chdir(tmp_path)
    uri = Settings(home=Path("rel-home")).tracking_uri
    assert uri.startswith("sqlite:////")
    assert uri.endswith(str(tmp_path.resolve() / "rel-home" / "mlflow.db"))


def test_settings_reads_environment(tmp_path, clean_env):
    clean_env.setenv("VOXELFLOW_HOME", str(tmp_path / "from-env"))
    clean_env.setenv("VOXELFLOW_SERVE_PORT", "9123")
    settings = Settings()
    assert settings.root == (tmp_path / "from-env").resolve()
    assert settings.serve_port == 9123
    assert settings.tracking_uri == f"sqlite:///{(tmp_path / 'from-env').resolve() / 'mlflow.db'}"


def test_settings_explicit_tracking_uri_wins(tmp_path, clean_env):
    clean_env.setenv("VOXELFLOW_MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert Settings(home=tmp_path).tracking_uri == "http://mlflow.example:5000"


def test_settings_store_and_database_default_to_home(tmp_path, clean_env):
    settings = Settings(home=tmp_path)
    assert settings.store is None and settings.database_url is None
    assert settings.store_url == str(tmp_path.resolve())
    assert settings.database == f"sqlite:///{tmp_path.resolve() / 'voxelflow.db'}"
    assert settings.database.startswith("sqlite:////")  # absolute, whatever the working directory


def test_settings_relative_home_gives_absolute_store_and_database(tmp_path, clean_env):
    clean_env.chdir(tmp_path)
    settings = Settings(home=Path("rel-home"))
    assert settings.store_url == str(tmp_path.resolve() / "rel-home")
    assert settings.database == f"sqlite:///{tmp_path.resolve() / 'rel-home' / 'voxelflow.db'}"


def test_settings_store_and_database_from_environment(tmp_path, clean_env):
    clean_env.setenv("VOXELFLOW_HOME", str(tmp_path))
    clean_env.setenv("VOXELFLOW_STORE", "s3://bucket/voxelflow")
    clean_env.setenv("VOXELFLOW_DATABASE_URL", "postgresql+psycopg://vf:pw@db.example:5432/voxelflow")
    settings = Settings()
    assert settings.store_url == "s3://bucket/voxelflow"
    assert settings.database == "postgresql+psycopg://vf:pw@db.example:5432/voxelflow"
    # the store is not local, so MLflow's artifacts go there too
    assert settings.artifact_root == "s3://bucket/voxelflow/mlflow-artifacts"
    assert settings.tracking_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


def test_settings_home_placeholder_expands_in_store_and_database(tmp_path, clean_env):
    settings = Settings(home=tmp_path, store="{home}/objects", database_url="sqlite:///{home}/shared.db")
    assert settings.store_url == f"{tmp_path.resolve()}/objects"
    assert settings.database == f"sqlite:///{tmp_path.resolve()}/shared.db"
    assert settings.artifact_root == (tmp_path.resolve() / "mlartifacts").as_uri()  # a local store


@pytest.mark.parametrize("store, expected", [
    ("s3://bucket/prefix", "s3://bucket/prefix/mlflow-artifacts"),
    ("s3://bucket/prefix/", "s3://bucket/prefix/mlflow-artifacts"),
    ("gs://bucket", "gs://bucket/mlflow-artifacts"),
    ("file:///srv/objects", None),
    ("/srv/objects", None),
], ids=["s3", "s3-slash", "gs", "file-url", "path"])
def test_settings_artifact_root_follows_a_remote_store(tmp_path, clean_env, store, expected):
    settings = Settings(home=tmp_path, store=store)
    assert settings.artifact_root == (expected or (tmp_path.resolve() / "mlartifacts").as_uri())


def test_settings_explicit_artifact_root_wins(tmp_path, clean_env):
    clean_env.setenv("VOXELFLOW_MLFLOW_ARTIFACT_ROOT", "s3://elsewhere/artifacts")
    assert Settings(home=tmp_path, store="s3://bucket/x").artifact_root == "s3://elsewhere/artifacts"
    assert Settings(home=tmp_path).artifact_root == "s3://elsewhere/artifacts"


def test_gates_that_read_a_metric_the_spec_does_not_compute_are_refused(demo_data, tmp_path):
    data = copy.deepcopy(demo_data)
    data["evaluate"]["metrics"] = ["hausdorff95"]
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError, match="need the metric 'dice'"):
        load_spec(path)
