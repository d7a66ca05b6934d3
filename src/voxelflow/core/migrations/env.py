"""Alembic environment: voxelflow passes the connection in (``Database.migrate``)."""

from alembic import context

from voxelflow.core.db import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=True,
    version_table="voxelflow_alembic_version",  # the database may be shared with MLflow, which has its own
)
with context.begin_transaction():
    context.run_migrations()
