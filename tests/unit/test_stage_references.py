"""Each built-in stage's references are typed records validated when they come back from JSON."""

from __future__ import annotations

import json
from dataclasses import asdict

import pydantic
import pytest

from voxelflow.spec.contracts import STAGES
from voxelflow.stages.context import BadReference
from voxelflow.stages.references import REFERENCES, RUN, reference
from voxelflow.stages.train import TrainOutcome


def test_every_reference_a_stage_reads_or_gives_has_a_type():
    named = {r for s in STAGES.values() for r in (*s.reads, s.gives)}
    assert named - {RUN} == set(REFERENCES), "contracts and reference types disagree"


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_each_reference_type_has_a_json_schema_and_holds_no_arrays(name):
    schema = pydantic.TypeAdapter(REFERENCES[name]).json_schema()
    assert schema["type"] == "object" and schema["properties"]
    assert "ndarray" not in json.dumps(schema) and "Tensor" not in json.dumps(schema)


def outcome() -> TrainOutcome:
    return TrainOutcome("checkpoints/w.safetensors", {"network": {"UNet": {}}}, [{"train_loss": 0.5}], 10, 1.5,
                        None, "curves/c.png", best_epoch=2, best_metric=0.7, planned_steps=10)


def test_a_reference_comes_back_from_json_equal():
    data = json.loads(json.dumps(asdict(outcome()) | {"written_by_a_newer_version": 1}))
    assert reference("candidate", data) == outcome()


@pytest.mark.parametrize("field, value", [("steps", "many"), ("history", {"train_loss": 1}), ("weights_key", None)])
def test_a_reference_of_the_wrong_type_is_refused_naming_the_field(field, value):
    data = json.loads(json.dumps(asdict(outcome())))
    data[field] = value
    with pytest.raises(BadReference, match=rf"TrainOutcome .*{field}"):
        reference("candidate", data)


def test_a_reference_missing_a_field_is_refused_naming_it():
    data = json.loads(json.dumps(asdict(outcome())))
    del data["curve_key"]
    with pytest.raises(BadReference, match="curve_key: Field required"):
        reference("candidate", data)
