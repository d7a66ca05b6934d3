"""MLflow 'models from code' entry: the logged model is this file plus its artifacts, never a pickle.

``registry.log_model`` ships the ``voxelflow`` package with the model (``code_paths``, under ``code/``),
which MLflow puts first on ``sys.path`` before running this file: the import below needs no installed
voxelflow, so `mlflow models serve` works in an environment made from the model's requirements.txt.
"""

from mlflow.models import set_model

from voxelflow.learn.model import SegmentationModel

set_model(SegmentationModel())
