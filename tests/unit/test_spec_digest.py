"""A spec's digest (lineage's spec_digest) does not change when voxelflow adds a key the spec does not use."""

from __future__ import annotations

import pytest

from tests.conftest import REPO
from voxelflow.spec.config import load_spec

# the digests these specs had before steps, version, evaluate.postprocess, train.collective_timeout_s and
# train.deterministic existed
RECORDED = {"demo.yaml": "b33229979a82c019", "spleen.yaml": "d15dc623b3182f1d"}


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_a_shipped_spec_keeps_its_recorded_digest(name):
    assert load_spec(REPO / "deployments" / "specs" / name).digest() == RECORDED[name]


def test_a_key_set_away_from_its_default_changes_the_digest():
    base = REPO / "deployments" / "specs" / "demo.yaml"
    digests = {load_spec(base, sets=[s]).digest() for s in
               ["train.deterministic=true", "evaluate.postprocess=[FillHoles]", "train.collective_timeout_s=60"]}
    assert len(digests) == 3 and RECORDED["demo.yaml"] not in digests
