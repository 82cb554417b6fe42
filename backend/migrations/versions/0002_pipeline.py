"""pipeline runs, loan facts and loan exceptions

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 05:04:42.449453
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('pipeline_runs',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('status', sa.Enum('queued', 'running', 'completed', 'failed', 'interrupted', name='pipeline_run_status'), nullable=False),
    sa.Column('input_path', sa.String(length=1024), nullable=False),
    sa.Column('output_prefix', sa.String(length=1024), nullable=True),
    sa.Column('total_loans', sa.Integer(), nullable=False),
    sa.Column('eligible_loans', sa.Integer(), nullable=False),
    sa.Column('ineligible_loans', sa.Integer(), nullable=False),
    sa.Column('rejected_loans', sa.Integer(), nullable=False),
    sa.Column('exception_count', sa.Integer(), nullable=False),
    sa.Column('phase_durations', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('error_message', sa.String(length=1000), nullable=True),
    sa.Column('created_by', sa.Integer(), nullable=True),
    sa.Column('trace_id', sa.String(length=32), nullable=True),
    sa.ForeignKeyConstraint(['created_by'], ['users.id'], name=op.f('fk_pipeline_runs_created_by_users'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_pipeline_runs'))
    )
    op.create_index(op.f('ix_pipeline_runs_created_by'), 'pipeline_runs', ['created_by'], unique=False)
    op.create_index('ix_pipeline_runs_status_created_at', 'pipeline_runs', ['status', 'created_at'], unique=False)
    op.create_table('loan_exceptions',
    sa.Column('run_id', sa.Uuid(), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('row_number', sa.Integer(), nullable=False),
    sa.Column('loan_id', sa.String(length=64), nullable=True),
    sa.Column('severity', sa.Enum('error', 'rule', name='loan_exception_severity'), nullable=False),
    sa.Column('rule_id', sa.String(length=64), nullable=False),
    sa.Column('field', sa.String(length=64), nullable=True),
    sa.Column('message', sa.String(length=500), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['pipeline_runs.id'], name=op.f('fk_loan_exceptions_run_id_pipeline_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id', 'seq', name=op.f('pk_loan_exceptions'))
    )
    op.create_index('ix_loan_exceptions_run_id_rule_id', 'loan_exceptions', ['run_id', 'rule_id'], unique=False)
    op.create_table('loan_facts',
    sa.Column('run_id', sa.Uuid(), nullable=False),
    sa.Column('row_number', sa.Integer(), nullable=False),
    sa.Column('loan_id', sa.String(length=64), nullable=False),
    sa.Column('borrower_id', sa.String(length=64), nullable=False),
    sa.Column('amount', sa.Numeric(precision=14, scale=2), nullable=False),
    sa.Column('rate', sa.Numeric(precision=8, scale=6), nullable=False),
    sa.Column('term_months', sa.Integer(), nullable=False),
    sa.Column('credit_score', sa.Integer(), nullable=False),
    sa.Column('annual_income', sa.Numeric(precision=14, scale=2), nullable=False),
    sa.Column('monthly_debt', sa.Numeric(precision=14, scale=2), nullable=False),
    sa.Column('property_value', sa.Numeric(precision=14, scale=2), nullable=False),
    sa.Column('state', sa.String(length=2), nullable=False),
    sa.Column('property_type', sa.String(length=32), nullable=False),
    sa.Column('occupancy', sa.String(length=32), nullable=False),
    sa.Column('origination_date', sa.Date(), nullable=False),
    sa.Column('sales_team', sa.String(length=100), nullable=True),
    sa.Column('monthly_payment', sa.Numeric(precision=14, scale=2), nullable=False),
    sa.Column('ltv', sa.Float(), nullable=False),
    sa.Column('dti', sa.Float(), nullable=False),
    sa.Column('grade', sa.String(length=2), nullable=False),
    sa.Column('eligible', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['pipeline_runs.id'], name=op.f('fk_loan_facts_run_id_pipeline_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id', 'row_number', name=op.f('pk_loan_facts'))
    )


def downgrade() -> None:
    op.drop_table('loan_facts')
    op.drop_index('ix_loan_exceptions_run_id_rule_id', table_name='loan_exceptions')
    op.drop_table('loan_exceptions')
    op.drop_index('ix_pipeline_runs_status_created_at', table_name='pipeline_runs')
    op.drop_index(op.f('ix_pipeline_runs_created_by'), table_name='pipeline_runs')
    op.drop_table('pipeline_runs')
    # PostgreSQL keeps enum types after their table is gone; SQLite has none (checkfirst).
    sa.Enum(name='loan_exception_severity').drop(op.get_bind(), checkfirst=True)
    sa.Enum(name='pipeline_run_status').drop(op.get_bind(), checkfirst=True)
