"""ledger.superseded_by: a case replaced by a later one that holds all of its objects

(a DICOM series that grew, a label that came after its image, a file replaced under its name)

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("ledger", sa.Column("superseded_by", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("ledger") as batch:
        batch.drop_column("superseded_by")
