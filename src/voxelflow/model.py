"""``voxelflow.model``: the import path that models registered before the library was laid out by concern
name in their MLflow entry file (``from voxelflow.model import SegmentationModel``). Kept so that such a model
loads in a process that has this voxelflow imported; the segmenter lives in :mod:`voxelflow.learn.model`."""

from voxelflow.learn.model import SegmentationModel, Segmenter

__all__ = ["SegmentationModel", "Segmenter"]
