"""ORM models. Constraint names follow one convention so migrations stay stable."""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
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
    Uuid,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


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
    __table_args__ = (Index("ix_pipeline_runs_status_created_at", "status", "created_at"),)

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
    created_by: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), index=True
    )
    # Reserved for the observability work: the trace the run belongs to.
    trace_id: Mapped[str | None] = mapped_column(String(32))


class LoanFact(Base):
    """A loan that passed validation, with its enrichment and eligibility verdict.

    Keyed by (run, row number in the tape): no sequence, so bulk COPY stays cheap.
    """

    __tablename__ = "loan_facts"

    run_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("pipeline_runs.id", ondelete="CASCADE"), primary_key=True
    )
    row_number: Mapped[int] = mapped_column(Integer, primary_key=True)
    loan_id: Mapped[str] = mapped_column(String(64))
    borrower_id: Mapped[str] = mapped_column(String(64))
    amount: Mapped[Decimal] = mapped_column(Numeric(14, 2))
    rate: Mapped[Decimal] = mapped_column(Numeric(8, 6))
    term_months: Mapped[int] = mapped_column(Integer)
    credit_score: Mapped[int] = mapped_column(Integer)
    annual_income: Mapped[Decimal] = mapped_column(Numeric(14, 2))
    monthly_debt: Mapped[Decimal] = mapped_column(Numeric(14, 2))
    property_value: Mapped[Decimal] = mapped_column(Numeric(14, 2))
    state: Mapped[str] = mapped_column(String(2))
    property_type: Mapped[str] = mapped_column(String(32))
    occupancy: Mapped[str] = mapped_column(String(32))
    origination_date: Mapped[date] = mapped_column(Date)
    sales_team: Mapped[str | None] = mapped_column(String(100))
    monthly_payment: Mapped[Decimal] = mapped_column(Numeric(14, 2))
    ltv: Mapped[float] = mapped_column(Float)
    dti: Mapped[float] = mapped_column(Float)
    grade: Mapped[str] = mapped_column(String(2))
    eligible: Mapped[bool] = mapped_column(Boolean)


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
