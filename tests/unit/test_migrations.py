"""Older spec shapes load, migrated, each change a ``SpecMigrated`` warning; a newer version is refused."""

from __future__ import annotations

import copy
import warnings

import pytest
import yaml

from voxelflow.spec.config import SpecError, load_spec, validate_spec
from voxelflow.spec.migrations import CURRENT, MIGRATIONS, SpecMigrated, migrate

# migration name -> cases of (old shape's changes to the demo spec, the new shape's, the warning's text)
CASES = {
    "deidentify-basic-profile": [
        ({"data": {"deidentify": "dicom-basic-profile"}}, {"data": {"deidentify": "basic-profile"}},
         "data.deidentify: dicom-basic-profile is now called basic-profile"),
    ],
    "deploy-autoscale": [
        ({"deploy": {"target": "local", "autoscale": {"min_replicas": 1, "max_replicas": 8, "target_cpu_percent": 70}}},
         {"deploy": {"target": "local"}},
         "deploy.autoscale: removed (nothing read it; a local deployment does not scale)"),
        ({"deploy": {"target": "kubernetes", "autoscale": {"min_replicas": 1, "max_replicas": 8,
                                                            "target_cpu_percent": 60}}},
         {"deploy": {"target": "kubernetes", "kubernetes": {"autoscale": {"min_replicas": 1, "max_replicas": 8,
                                                                          "target": 60, "metric": "cpu"}}}},
         "deploy.autoscale: moved to deploy.kubernetes.autoscale (target_cpu_percent is now target, with metric: cpu)"),
    ],
}


def _with(base: dict, changes: dict) -> dict:
    """``base`` with ``changes`` merged into its data section and its deploy section replaced by theirs."""
    out = copy.deepcopy(base)
    for section, values in copy.deepcopy(changes).items():
        out[section] = values if section == "deploy" else {**out[section], **values}
    return out


def test_every_migration_is_tested():
    assert set(CASES) == {m.name for m in MIGRATIONS}
    assert all(m.version <= CURRENT for m in MIGRATIONS)


@pytest.mark.parametrize("name, old, new, text", [(n, *c) for n, cases in CASES.items() for c in cases])
def test_a_migration_brings_the_old_shape_to_the_new(demo_data, name, old, new, text):
    old_spec = _with(demo_data, old)
    new_spec = {**_with(demo_data, new), "version": CURRENT}
    before = copy.deepcopy(old_spec)
    migrated, changes = migrate(old_spec, "old.yaml")
    assert old_spec == before  # the caller's mapping is left as it was
    assert migrated == new_spec
    assert len(changes) == 1 and changes[0].startswith(f"old.yaml: {text}") and "spec version 0" in changes[0]
    with pytest.warns(SpecMigrated, match=text.replace("(", r"\(").replace(")", r"\)")):
        loaded = validate_spec(old_spec, "old.yaml")
    assert loaded == validate_spec(new_spec, "new.yaml")


def test_a_current_spec_is_not_migrated(demo_data):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = validate_spec(demo_data, "demo")
        assert migrate({**demo_data, "version": 1}) == ({**demo_data, "version": 1}, [])
    assert spec.version == CURRENT


def test_an_explicit_current_version_does_not_migrate_old_values(demo_data):
    data = _with(demo_data, {"data": {"deidentify": "dicom-basic-profile"}})
    data["version"] = 1
    with pytest.raises(SpecError, match="demo: data.deidentify: Input should be 'basic-profile' or 'none'"):
        validate_spec(data, "demo")


@pytest.mark.parametrize("version, message", [
    (2, "version: the spec is version 2, but this voxelflow reads spec versions up to 1: upgrade voxelflow to use it"),
    ("one", "version: expected a spec version (1), got 'one'"),
    (True, "version: expected a spec version (1), got True"),
    (-1, "version: expected a spec version (1), got -1"),
])
def test_a_version_it_cannot_read_is_refused(demo_data, version, message):
    with pytest.raises(SpecError) as err:
        validate_spec({**demo_data, "version": version}, "demo")
    assert str(err.value) == f"demo: {message}"


def test_load_spec_migrates_the_merged_spec(demo_spec_path, tmp_path):
    overlay = tmp_path / "old-overlay.yaml"
    overlay.write_text(yaml.safe_dump({"data": {"deidentify": "dicom-basic-profile"}}))
    with pytest.warns(SpecMigrated) as caught:
        spec = load_spec(demo_spec_path, overlays=[overlay])
    assert spec.data.deidentify == "basic-profile"
    (warning,) = [w for w in caught if issubclass(w.category, SpecMigrated)]
    assert str(warning.message).startswith(f"{demo_spec_path} + {overlay}: data.deidentify")
