"""The type of each reference a built-in stage reads or gives (:data:`voxelflow.spec.contracts.STAGES`).

A reference is the JSON-able record of what a stage made: ids, digests, store keys and scores, never
arrays. It crosses process boundaries (a stage placed on a work pool leaves it as JSON in the store) and
comes back validated against its type (:func:`voxelflow.stages.context.from_dict`).
"""

from __future__ import annotations

from typing import Any

from voxelflow.data.ingest import IngestReport
from voxelflow.data.preprocess import PreprocessReport
from voxelflow.stages.context import from_dict
from voxelflow.stages.deploy import Deployment
from voxelflow.stages.evaluate import Evaluation
from voxelflow.stages.promote import Promotion
from voxelflow.stages.split import Split
from voxelflow.stages.train import TrainOutcome

REFERENCES: dict[str, type] = {
    "dataset": IngestReport,  # the cases the dataset holds, what this run added, what it quarantined
    "preprocessed": PreprocessReport,  # the preprocessed store of those cases (its key names the transforms)
    "split": Split,  # the train, validation and test sides
    "candidate": TrainOutcome,  # the trained weights' store key, the model's configuration, the curves
    "evaluation": Evaluation,  # the candidate's and the champion's scores on the test side
    "promotion": Promotion,  # the registered version and the decision
    "deployment": Deployment,  # where the champion was served and its smoke test
}
RUN = "run"  # the MLflow run id (a string): the one reference that is not a record


def reference(name: str, data: dict[str, Any]) -> Any:
    """The reference ``name`` rebuilt from its JSON form, validated against its type."""
    return from_dict(REFERENCES[name], data)
