"""voxelflow: the whole life of a medical-imaging model, stage by stage.

The library is plain Python (no Prefect): one module per lifecycle noun.
"""

__version__ = "0.1.0"
