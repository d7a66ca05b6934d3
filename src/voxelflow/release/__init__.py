"""The MLflow registry, the promotion policy, approval and lineage."""
