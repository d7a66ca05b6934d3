"""MLflow 'models from code' entry: the logged model is this file plus its artifacts, never a pickle."""

from mlflow.models import set_model

from voxelflow.model import SegmentationModel

set_model(SegmentationModel())
