"""run scoping: the sales team a run belongs to

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 12:00:00.000000

Existing runs keep NULL: visible to admins, and to their creator when known.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('pipeline_runs') as batch:
        batch.add_column(sa.Column('sales_team_id', sa.Integer(), nullable=True))
        batch.create_index('ix_pipeline_runs_sales_team_id', ['sales_team_id'], unique=False)
        batch.create_foreign_key(
            'fk_pipeline_runs_sales_team_id_sales_teams',
            'sales_teams',
            ['sales_team_id'],
            ['id'],
            ondelete='SET NULL',
        )


def downgrade() -> None:
    with op.batch_alter_table('pipeline_runs') as batch:
        batch.drop_constraint('fk_pipeline_runs_sales_team_id_sales_teams', type_='foreignkey')
        batch.drop_index('ix_pipeline_runs_sales_team_id')
        batch.drop_column('sales_team_id')
