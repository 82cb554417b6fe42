"""run ownership: owner, lease, attempts, queue time, request link

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 18:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('pipeline_runs') as batch:
        batch.add_column(sa.Column('request_traceparent', sa.String(length=55), nullable=True))
        batch.add_column(sa.Column('owner', sa.String(length=200), nullable=True))
        batch.add_column(sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column('attempts', sa.Integer(), server_default='0', nullable=False))
        batch.add_column(sa.Column('queued_at', sa.DateTime(timezone=True), nullable=True))
        batch.create_index('ix_pipeline_runs_lease_expires_at', ['lease_expires_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('pipeline_runs') as batch:
        batch.drop_index('ix_pipeline_runs_lease_expires_at')
        batch.drop_column('queued_at')
        batch.drop_column('attempts')
        batch.drop_column('lease_expires_at')
        batch.drop_column('owner')
        batch.drop_column('request_traceparent')
