"""ORM models. Constraint names follow one convention so migrations stay stable."""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, assert_never

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Date,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    Uuid,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeEngine

from backend.pipeline.columns import LOAN_COLUMNS, Kind, LoanColumn

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


# The largest value of a PostgreSQL INTEGER column (ids, counts): inputs meant for one
# are bounded by it at the edge, so an oversized number is a 422, not a database error.
INT4_MAX = 2**31 - 1


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Role(enum.StrEnum):
    ADMIN = "admin"
    ANALYST = "analyst"
    VIEWER = "viewer"


class SalesTeam(Base):
    __tablename__ = "sales_teams"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    region: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    users: Mapped[list[User]] = relationship(back_populates="sales_team")


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(50), unique=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    hashed_password: Mapped[str] = mapped_column(String(100))
    role: Mapped[Role] = mapped_column(
        Enum(Role, name="user_role", values_callable=lambda e: [m.value for m in e]),
        default=Role.VIEWER,
    )
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    sales_team_id: Mapped[int | None] = mapped_column(
        ForeignKey("sales_teams.id", ondelete="SET NULL"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    sales_team: Mapped[SalesTeam | None] = relationship(back_populates="users")


class RunStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


class Severity(enum.StrEnum):
    """`error`: the row could not be read and left the run; `rule`: an eligibility failure."""

    ERROR = "error"
    RULE = "rule"


def _values(e: type[enum.Enum]) -> list[str]:
    return [str(m.value) for m in e]


class PipelineRun(Base):
    """One execution of the pipeline over one input tape."""

    __tablename__ = "pipeline_runs"
    __table_args__ = (
        Index("ix_pipeline_runs_status_created_at", "status", "created_at"),
        Index("ix_pipeline_runs_lease_expires_at", "lease_expires_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    status: Mapped[RunStatus] = mapped_column(
        Enum(RunStatus, name="pipeline_run_status", values_callable=_values),
        default=RunStatus.QUEUED,
    )
    input_path: Mapped[str] = mapped_column(String(1024))
    output_prefix: Mapped[str | None] = mapped_column(String(1024))
    total_loans: Mapped[int] = mapped_column(Integer, default=0)
    eligible_loans: Mapped[int] = mapped_column(Integer, default=0)
    ineligible_loans: Mapped[int] = mapped_column(Integer, default=0)
    rejected_loans: Mapped[int] = mapped_column(Integer, default=0)
    exception_count: Mapped[int] = mapped_column(Integer, default=0)
    # Seconds spent in each phase, e.g. {"ingest": 0.41, "validate": 0.92, ...}.
    phase_durations: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error_message: Mapped[str | None] = mapped_column(String(1000))
    # Who queued the run and their sales team at that moment: the run, its facts,
    # exceptions and outputs are visible to that team (or, with no team, to that
    # user) and to admins; see backend/pipeline/service.py `readable_runs`.
    created_by: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), index=True
    )
    sales_team_id: Mapped[int | None] = mapped_column(
        ForeignKey("sales_teams.id", ondelete="SET NULL"), index=True
    )
    # The trace the run's executions belong to (32 hex), planned when it is queued.
    trace_id: Mapped[str | None] = mapped_column(String(32))
    # The span of the request that queued the run, as a W3C traceparent: the run's
    # spans link back to it, whichever process executes the run and however late.
    request_traceparent: Mapped[str | None] = mapped_column(String(55))
    # Ownership (see backend/pipeline/leases.py): the process that holds the run,
    # until when, and how many executions have started.
    owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # When the run last entered the queue (creation or re-queue): the queue wait starts here.
    queued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


def _fact_type(column: LoanColumn) -> TypeEngine[Any]:
    """The SQL type of a loan column of this kind."""
    match column.kind:
        case Kind.TEXT | Kind.CODE:
            return String(column.length)
        case Kind.MONEY:
            return Numeric(14, 2)
        case Kind.RATE:
            return Numeric(8, 6)
        case Kind.RATIO:
            return Float()
        case Kind.INT:
            return Integer()
        case Kind.DATE:
            return Date()
        case Kind.FLAG:
            return Boolean()
        case _:
            assert_never(column.kind)


# Built from LOAN_COLUMNS, in its order; changing this table needs a migration.
loan_facts = Table(
    "loan_facts",
    Base.metadata,
    Column("run_id", Uuid, ForeignKey("pipeline_runs.id", ondelete="CASCADE"), primary_key=True),
    *(Column(c.name, _fact_type(c), primary_key=c.key, nullable=c.nullable) for c in LOAN_COLUMNS),
)


class LoanFact(Base):
    """A loan that passed validation, with its enrichment and eligibility verdict.

    Keyed by (run, row number in the tape): no sequence, so bulk COPY stays cheap.
    The columns are `loan_facts`, built from LOAN_COLUMNS; the annotations below
    only type them (test_columns checks that they match).
    """

    __table__ = loan_facts

    run_id: Mapped[uuid.UUID]
    row_number: Mapped[int]
    loan_id: Mapped[str]
    borrower_id: Mapped[str]
    amount: Mapped[Decimal]
    rate: Mapped[Decimal]
    term_months: Mapped[int]
    credit_score: Mapped[int]
    annual_income: Mapped[Decimal]
    monthly_debt: Mapped[Decimal]
    property_value: Mapped[Decimal]
    state: Mapped[str]
    property_type: Mapped[str]
    occupancy: Mapped[str]
    origination_date: Mapped[date]
    sales_team: Mapped[str | None]
    monthly_payment: Mapped[Decimal]
    ltv: Mapped[float]
    dti: Mapped[float]
    grade: Mapped[str]
    eligible: Mapped[bool]


class LoanException(Base):
    """A problem found in one tape row: unreadable data or a failed eligibility rule."""

    __tablename__ = "loan_exceptions"
    __table_args__ = (Index("ix_loan_exceptions_run_id_rule_id", "run_id", "rule_id"),)

    run_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("pipeline_runs.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    row_number: Mapped[int] = mapped_column(Integer)
    loan_id: Mapped[str | None] = mapped_column(String(64))
    severity: Mapped[Severity] = mapped_column(
        Enum(Severity, name="loan_exception_severity", values_callable=_values)
    )
    rule_id: Mapped[str] = mapped_column(String(64))
    field: Mapped[str | None] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(String(500))
