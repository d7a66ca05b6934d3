"""Prefect flows (the entry points deployments name) and the ``voxelflow`` CLI."""
