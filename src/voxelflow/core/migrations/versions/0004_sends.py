"""sends: each DICOM result of a model version sent to a destination, or still to be sent

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sends",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("pipeline", sa.String(200), nullable=False),
        sa.Column("case_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("version", sa.String(32), nullable=False),
        sa.Column("destination", sa.String(1024), nullable=False),
        sa.Column("object", sa.String(1024), nullable=False),
        sa.Column("sop_instance", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("pipeline", "case_id", "kind", "model", "version", "destination", name="uq_sends_result"),
    )
    op.create_index("ix_sends_state", "sends", ["state"])


def downgrade() -> None:
    op.drop_index("ix_sends_state", "sends")
    op.drop_table("sends")
