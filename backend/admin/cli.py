"""Operator commands: `python -m backend.admin.cli <command>`.

Results (tables, `--json` documents) go to stdout; messages, errors, progress
bars and log lines (JSON, as the service writes them) go to stderr, so `--json`
output can be piped as is. Exit codes: 0 done, 1 failed (database unreachable,
conflict, not at the migration head, unknown user, a run that failed, a check
that failed), 2 bad usage (including a password the policy refuses, or two
entries that differ).

Every command is traced: one span `cli <command>` in a trace of service
`loan-engine-cli`, exported as the OTEL_* settings say and flushed (within
OTEL_SHUTDOWN_TIMEOUT_SECONDS) before the process exits.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import click
import typer
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from backend.config import ConfigurationError, Settings, get_settings
from backend.database import Database
from backend.models import Role
from backend.observability.logging_config import (
    configure_logging,
    replay_warnings,
    warnings_held_for_logging,
)
from backend.observability.redaction import redact_text

if TYPE_CHECKING:
    from backend.admin.checks import CheckResult
    from backend.admin.service import HereRun
    from backend.pipeline.engine import PhaseProgress

T = TypeVar("T")
P = ParamSpec("P")

# The service name of the CLI's spans and log lines, whatever OTEL_SERVICE_NAME says:
# the CLI often runs with the service's own environment (ECS exec, a task override),
# and its work must not pass for the service's in a trace search.
CLI_SERVICE_NAME = "loan-engine-cli"
PHASES = ("ingest", "validate", "normalize", "enrich", "eligibility", "persist", "report")

# Locals never go into a traceback: they may hold a password or a database URL.
app = typer.Typer(
    help="Loan Engine administration commands.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
# soft_wrap: an error stays one line however narrow the terminal (or a pipe) is.
console = Console(stderr=True, soft_wrap=True)
# Piped output is not cut to 80 columns: a table read by a script or a log keeps whole values.
results = Console(width=None if sys.stdout.isatty() else 200)

# What a bad DATABASE_URL or an unusable database raises: a missing driver is an ImportError.
DATABASE_ERRORS = (SQLAlchemyError, OSError, TimeoutError, ImportError)

JsonOption = typer.Option(False, "--json", help="Print one JSON document instead of tables.")


class _Stderr:
    """Whatever `sys.stderr` is at write time: while a progress display is live, rich
    redirects it, so log lines print above the bars instead of through them."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


_log_stream = _Stderr()


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print one `error:` line on stderr; raise the returned exception to exit with `code`.

    The line is also an event of the command's span (it is shown to the operator, so
    it holds nothing secret).
    """
    console.print(f"[red]error:[/red] {escape(message)}")
    trace.get_current_span().add_event("cli.error", {"message": message, "exit_code": code})
    return typer.Exit(code=code)


def validation_reasons(exc: ValidationError) -> str:
    """Field names and reasons only: the rejected values (a password) are never echoed."""
    reasons = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        reasons.append(f"{where}: {error['msg']}" if where else error["msg"])
    return "; ".join(reasons)


def cli_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"OTEL_SERVICE_NAME": CLI_SERVICE_NAME})


def load_settings() -> Settings:
    """The process settings, with logging configured from them (JSON lines on stderr).

    An invalid configuration is one clear line and exit 1, not a traceback.
    """
    try:
        with warnings_held_for_logging() as early_warnings:
            settings = cli_settings(get_settings())
    except (ConfigurationError, ValidationError) as exc:
        raise fail(f"configuration: {exc}") from None
    configure_logging(settings, stream=_log_stream)
    replay_warnings(early_warnings)
    return settings


@contextmanager
def command_span(settings: Settings, command: str) -> Iterator[Span]:
    """Trace one command: tracing started from `settings` (service `loan-engine-cli`),
    the span `cli <command>` current inside the block, and the spans flushed, within
    OTEL_SHUTDOWN_TIMEOUT_SECONDS, after it.

    The span records the exit code (`process.exit.code`) and is an error when the
    command exits non-zero, is interrupted, or raises.
    """
    from backend.observability.span_export import Tracing
    from backend.pipeline.telemetry import record_error

    tracing = Tracing(settings)
    tracing.start()
    tracer = trace.get_tracer("backend.admin.cli")
    try:
        with tracer.start_as_current_span(
            f"cli {command}",
            kind=SpanKind.INTERNAL,
            attributes={"cli.command": command},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield span
            except click.exceptions.Exit as exc:
                span.set_attribute("process.exit.code", exc.exit_code)
                if exc.exit_code:
                    span.set_status(Status(StatusCode.ERROR, f"exit code {exc.exit_code}"))
                raise
            except (KeyboardInterrupt, click.exceptions.Abort):
                span.set_status(Status(StatusCode.ERROR, "interrupted"))
                raise
            except BaseException as exc:
                record_error(span, exc)
                raise
            else:
                span.set_attribute("process.exit.code", 0)
    finally:
        tracing.shutdown()


def traced(command: Callable[P, None]) -> Callable[P, None]:
    """Run `command` inside `command_span`, with the process settings (loaded first:
    an invalid configuration exits 1 before the command runs). The span's name is
    the function's with dashes, which is the command's name (`run_stats`: run-stats)."""
    name = command.__name__.replace("_", "-")

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        settings = load_settings()
        with command_span(settings, name):
            command(*args, **kwargs)

    return run


def read_new_password(from_stdin: bool) -> str:
    """A new password: the first line of stdin, or typed twice at hidden prompts.

    Two entries that differ exit 2 at once (no third try: a script driving the
    prompts must not loop). The password is never echoed or logged.
    """
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    password: str = typer.prompt("New password", hide_input=True)
    repeated: str = typer.prompt("Repeat the new password", hide_input=True)
    if password != repeated:
        raise fail("the two passwords differ; nothing was changed", code=2)
    return password


def run_with_database(settings: Settings, work: Callable[[Database], Awaitable[T]]) -> T:
    """Run `work` with a database of `settings`, disposed afterwards.

    A database that is unreachable or fails is one `error:` line and exit 1.
    """

    async def run() -> T:
        database = Database(settings)
        try:
            return await work(database)
        finally:
            await database.dispose()

    try:
        return asyncio.run(run())
    except DATABASE_ERRORS as exc:
        raise fail(f"database: {describe_error(exc)}") from None


def describe_error(exc: BaseException) -> str:
    """One line about a database error: the driver's own message, without SQL,
    parameters or credentials (SQLAlchemy appends those on later lines)."""
    cause: BaseException = exc
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        cause = exc.orig
    text = str(cause).strip()
    first = text.splitlines()[0] if text else ""
    # asyncpg errors adapted by SQLAlchemy read "<class '...UndefinedTableError'>: message".
    first = re.sub(r"^<class '[\w.]+'>: ", "", first)
    return redact_text(f"{type(cause).__name__}: {first}" if first else type(cause).__name__)


def print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")


@app.command()
@traced
def migrate(revision: str = typer.Argument("head", help="Target revision.")) -> None:
    """Apply database migrations up to REVISION."""
    from alembic.util import CommandError

    from backend.migrations.runner import upgrade

    settings = load_settings()
    try:
        upgrade(settings.DATABASE_URL, revision=revision)
    except CommandError as exc:  # an unknown revision, a broken script chain
        raise fail(f"migrate: {exc}") from None
    except DATABASE_ERRORS as exc:
        raise fail(f"database: {describe_error(exc)}") from None
    console.print(f"[green]database migrated to {escape(revision)}[/green]")


@app.command("seed-admin")
@traced
def seed_admin() -> None:
    """Create the admin from ADMIN_USERNAME / ADMIN_PASSWORD when no admin exists."""
    from backend.users.service import ensure_admin

    settings = load_settings()

    async def seed(database: Database) -> bool:
        async with database.session() as session:
            created = await ensure_admin(session, settings)
        return created is not None

    try:
        created = run_with_database(settings, seed)
    except ConfigurationError as exc:
        raise fail(str(exc)) from None
    console.print("admin created" if created else "an admin already exists; nothing to do")


@app.command("generate-tape")
@traced
def generate_tape(
    rows: int = typer.Option(..., "--rows", min=0, help="Data rows to write."),
    out: Path = typer.Option(..., "--out", help="CSV file to write (overwritten)."),
    seed: int = typer.Option(1, "--seed", help="Same seed, same file."),
    ineligible_share: float = typer.Option(
        0.15, "--ineligible-share", min=0.0, max=1.0, help="Share of rows breaking one rule."
    ),
    malformed_share: float = typer.Option(
        0.02, "--malformed-share", min=0.0, max=1.0, help="Share of rows with a bad value."
    ),
) -> None:
    """Write a realistic sample loan tape (see the README's "Loan tapes")."""
    from backend.pipeline.tape import write_tape

    if ineligible_share + malformed_share > 1:
        console.print("[red]error:[/red] the two shares add up to more than 1")
        raise typer.Exit(code=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_tape(
        out,
        rows,
        seed=seed,
        ineligible_share=ineligible_share,
        malformed_share=malformed_share,
    )
    console.print(f"wrote {rows} rows to {out}")


@app.command("list-users")
@traced
def list_users(
    role: Role | None = typer.Option(None, "--role", help="Only users with this role."),
    as_json: bool = JsonOption,
) -> None:
    """List users: id, username, email, role, active, sales team."""
    from backend.users.service import users_for_report

    settings = load_settings()

    async def query(database: Database) -> list[dict[str, Any]]:
        async with database.session() as session:
            users = await users_for_report(session, role)
        return [
            {
                "id": user.id,
                "username": user.username,
                "email": user.email,
                "role": user.role.value,
                "is_active": user.is_active,
                "sales_team_id": user.sales_team_id,
                "created_at": user.created_at.isoformat(),
            }
            for user in users
        ]

    rows = run_with_database(settings, query)
    if as_json:
        print_json(rows)
        return
    table = Table("ID", "Username", "Email", "Role", "Active", "Team", title="Users")
    for row in rows:
        table.add_row(
            str(row["id"]),
            escape(row["username"]),
            escape(row["email"]),
            row["role"],
            "yes" if row["is_active"] else "no",
            str(row["sales_team_id"] or "-"),
        )
    results.print(table)
    results.print(f"Total: {len(rows)} users")


@app.command("create-user")
@traced
def create_user(
    username: str = typer.Argument(..., help="3-50 characters: letters, digits, . _ -"),
    email: str = typer.Argument(..., help="Email address (stored lower-case)."),
    role: Role = typer.Option(Role.VIEWER, "--role", help="Role of the new account."),
    password_stdin: bool = typer.Option(
        False, "--password-stdin", help="Read the password from the first line of stdin."
    ),
) -> None:
    """Create an account; the password is prompted for (twice, hidden) unless --password-stdin.

    A password the policy refuses, or two entries that differ, exit 2.
    """
    from backend.auth.schemas import RegisterRequest
    from backend.errors import Conflict
    from backend.users.service import create_user as create

    password = read_new_password(password_stdin)
    try:
        data = RegisterRequest(username=username, email=email, password=password)
    except ValidationError as exc:
        raise fail(validation_reasons(exc), code=2) from None
    settings = load_settings()

    async def insert(database: Database) -> int:
        async with database.session() as session:
            user = await create(session, settings, data, role)
            return user.id

    try:
        user_id = run_with_database(settings, insert)
    except Conflict as exc:
        raise fail(exc.message) from None
    console.print(f"created user id={user_id} username={escape(username)} role={role.value}")


@app.command("run-stats")
@traced
def run_stats(
    last: int = typer.Option(10, "--last", min=0, help="How many of the newest runs to show."),
    as_json: bool = JsonOption,
) -> None:
    """Pipeline runs: counts by status, totals of loans, eligible loans and exceptions."""
    from backend.pipeline.service import run_statistics

    settings = load_settings()

    async def query(database: Database) -> dict[str, Any]:
        async with database.session() as session:
            stats = await run_statistics(session, recent=last)
        return {
            "total_runs": stats.total_runs,
            "by_status": stats.by_status,
            "total_loans": stats.total_loans,
            "eligible_loans": stats.eligible_loans,
            "exceptions": stats.exception_count,
            "recent_runs": [
                {
                    "id": str(run.id),
                    "status": run.status.value,
                    "created_at": run.created_at.isoformat(),
                    "total_loans": run.total_loans,
                    "eligible_loans": run.eligible_loans,
                    "exceptions": run.exception_count,
                    "duration_seconds": (
                        round((run.finished_at - run.started_at).total_seconds(), 3)
                        if run.started_at and run.finished_at
                        else None
                    ),
                    "input_path": run.input_path,
                }
                for run in stats.recent
            ],
        }

    document = run_with_database(settings, query)
    if as_json:
        print_json(document)
        return
    counts = Table("Status", "Runs", title="Pipeline runs")
    for status, count in document["by_status"].items():
        counts.add_row(status, str(count))
    counts.add_row("[bold]total[/bold]", f"[bold]{document['total_runs']}[/bold]")
    results.print(counts)
    results.print(f"Total loans:      {document['total_loans']}")
    results.print(f"Eligible loans:   {document['eligible_loans']}")
    results.print(f"Exceptions:       {document['exceptions']}")
    if not document["recent_runs"]:
        return
    recent = Table(
        "Run", "Status", "Created", "Loans", "Eligible", "Exceptions", "Seconds",
        title=f"Latest {len(document['recent_runs'])} runs",
    )  # fmt: skip
    for run in document["recent_runs"]:
        seconds = run["duration_seconds"]
        recent.add_row(
            run["id"],
            run["status"],
            run["created_at"][:19],
            str(run["total_loans"]),
            str(run["eligible_loans"]),
            str(run["exceptions"]),
            "-" if seconds is None else f"{seconds:.2f}",
        )
    results.print(recent)


@app.command("db-status")
@traced
def db_status(
    timeout: float = typer.Option(10.0, "--timeout", min=0.1, help="Seconds the probe may take."),
    as_json: bool = JsonOption,
) -> None:
    """Database reachability, latency, version, migration state and pool settings.

    Exit code 1 when the database is unreachable or not at the migration head.
    """
    from backend.admin.service import database_status

    settings = load_settings()
    try:
        status = asyncio.run(database_status(settings, limit_seconds=timeout))
    except DATABASE_ERRORS as exc:  # DATABASE_URL unparseable or its driver missing
        raise fail(f"database: {describe_error(exc)}") from None
    document = {
        "reachable": status.reachable,
        "error": status.error,
        "url": status.url,
        "dialect": status.dialect,
        "driver": status.driver,
        "server_version": status.server_version,
        "latency_ms": status.latency_ms,
        "current_revision": list(status.current_revisions),
        "head_revision": list(status.head_revisions),
        "at_head": status.at_head,
        "pool": status.pool,
    }
    if as_json:
        print_json(document)
    else:
        table = Table("Check", "Value", title="Database", show_header=False)
        table.add_row("URL", escape(status.url))
        table.add_row("Dialect", f"{status.dialect}+{status.driver}")
        connection = "[green]OK[/green]" if status.reachable else "[red]FAILED[/red]"
        table.add_row("Connection", connection)
        if status.reachable:
            table.add_row("Server version", status.server_version or "?")
            table.add_row("Latency (SELECT 1)", f"{status.latency_ms:.2f} ms")
            current = escape(", ".join(status.current_revisions))
            if not current:
                migration = "[red]none (not migrated)[/red]"
            elif status.at_head:
                migration = f"{current} [green](at head)[/green]"
            else:
                migration = f"{current} [red](not head)[/red]"
            table.add_row("Migration", migration)
        table.add_row("Head revision", ", ".join(status.head_revisions))
        for key, value in status.pool.items():
            table.add_row(f"Pool {key}", str(value))
        results.print(table)
    if not status.reachable:
        raise fail(f"database unreachable: {status.error}")
    if not status.at_head:
        raise fail("database is not at the migration head: run `migrate`")


# ------------------------------------------------------------------ sales teams
# A user's team decides which tapes and runs they read (backend/scoping.py).
# TEAM and USER name a team (or user) by exact name first, else by id.


def _validation_problems(exc: ValidationError) -> str:
    """Field names and reasons, without the rejected values."""
    return "; ".join(
        f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}" for error in exc.errors()
    )


@app.command("create-team")
@traced
def create_team(
    name: str = typer.Argument(..., help="1-100 characters, unique."),
    region: str | None = typer.Option(None, "--region", help="Optional region label."),
) -> None:
    """Create a sales team; a taken name -> exit 1."""
    from backend.teams import service
    from backend.teams.schemas import TeamCreate

    try:
        data = TeamCreate(name=name, region=region)
    except ValidationError as exc:
        raise fail(_validation_problems(exc), code=2) from None
    settings = load_settings()

    async def insert(database: Database) -> tuple[int, str]:
        async with database.session() as session:
            team = await service.create_team(session, data.name, data.region)
            return team.id, team.name

    try:
        team_id, team_name = run_with_database(settings, insert)
    except service.TeamNameTaken as exc:
        raise fail(exc.message) from None
    console.print(f"created team id={team_id} name={escape(team_name)}")


@app.command("rename-team")
@traced
def rename_team(
    team: str = typer.Argument(..., help="The team: its name or id."),
    new_name: str = typer.Argument(..., help="The new name (1-100 characters, unique)."),
) -> None:
    """Rename a sales team; unknown team or taken name -> exit 1."""
    from backend.teams import service
    from backend.teams.schemas import TeamUpdate

    try:
        data = TeamUpdate(name=new_name)
    except ValidationError as exc:
        raise fail(_validation_problems(exc), code=2) from None
    settings = load_settings()

    async def rename(database: Database) -> int:
        async with database.session() as session:
            found = await service.find_team(session, team)
            await service.update_team(session, found.id, {"name": data.name})
            return found.id

    try:
        team_id = run_with_database(settings, rename)
    except (service.TeamNotFound, service.TeamNameTaken) as exc:
        raise fail(exc.message) from None
    console.print(f"renamed team id={team_id} to {escape(str(data.name))}")


@app.command("list-teams")
@traced
def list_teams(as_json: bool = JsonOption) -> None:
    """List sales teams: id, name, region, members."""
    from backend.teams import service

    settings = load_settings()

    async def query(database: Database) -> list[dict[str, Any]]:
        async with database.session() as session:
            teams, _total = await service.list_teams(session)
            return service.as_rows(teams)

    rows = run_with_database(settings, query)
    if as_json:
        print_json(rows)
        return
    table = Table("ID", "Name", "Region", "Members", title="Sales teams")
    for row in rows:
        table.add_row(
            str(row["id"]), escape(row["name"]), escape(row["region"] or "-"),
            str(row["member_count"]),
        )  # fmt: skip
    results.print(table)
    results.print(f"Total: {len(rows)} teams")


@app.command("assign-team")
@traced
def assign_team(
    user: str = typer.Argument(..., help="The user: username or id."),
    team: str | None = typer.Argument(None, help="The team: its name or id."),
    none: bool = typer.Option(False, "--none", help="Take the user out of any team."),
) -> None:
    """Put USER in TEAM, or in no team with --none (exactly one of the two)."""
    from backend.teams import service

    if (team is None) == (not none):
        raise fail("give either TEAM or --none", code=2)
    settings = load_settings()

    async def assign(database: Database) -> tuple[str, str | None]:
        async with database.session() as session:
            member = await service.find_user(session, user)
            target = await service.find_team(session, team) if team is not None else None
            await service.assign_user(session, member, target)
            return member.username, target.name if target is not None else None

    try:
        username, team_name = run_with_database(settings, assign)
    except (service.UserNotFound, service.TeamNotFound) as exc:
        raise fail(exc.message) from None
    where = f"team {escape(team_name)}" if team_name is not None else "no team"
    console.print(f"user {escape(username)} is now in {where}")


@app.command("reset-password")
@traced
def reset_password(
    username: str = typer.Argument(..., help="The account whose password is replaced."),
    password_stdin: bool = typer.Option(
        False, "--password-stdin", help="Read the new password from the first line of stdin."
    ),
) -> None:
    """Give USERNAME a new password: prompted twice (hidden) unless --password-stdin.

    Same policy as the API's; hashed with BCRYPT_ROUNDS. Exit 1 when there is no
    such user (checked before asking), 2 when the password is refused or the two
    entries differ. The password is never printed or logged.
    """
    from backend.auth.schemas import check_password
    from backend.errors import NotFound
    from backend.users.service import set_password, users_for_report

    settings = load_settings()

    async def exists(database: Database) -> bool:
        async with database.session() as session:
            return any(user.username == username for user in await users_for_report(session))

    if not run_with_database(settings, exists):
        raise fail(f"no user named {username!r}")
    password = read_new_password(password_stdin)
    try:
        check_password(password)
    except ValidationError as exc:
        raise fail(f"password: {validation_reasons(exc)}", code=2) from None

    async def reset(database: Database) -> bool:
        async with database.session() as session:
            user = await set_password(session, settings, username, password)
            return user.is_active

    try:
        active = run_with_database(settings, reset)
    except NotFound:  # deleted between the check and the change
        raise fail(f"no user named {username!r}") from None
    note = "" if active else " (the account is inactive: it cannot sign in until re-activated)"
    console.print(f"password changed for {escape(username)}{note}")


class PhaseBars:
    """One rich progress bar per phase of a run, on stderr (the `RunWatcher` of
    `execute_here`). Bars measure the tape read so far (ingest's bytes), the same
    for every phase while batches flow, since each batch passes all seven; a bar
    completes when its phase has finished. Rows and exceptions are per phase."""

    def __init__(self, enabled: bool) -> None:
        self.progress = Progress(
            TextColumn("{task.description:<12}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("{task.fields[rows]:>9} rows"),
            TextColumn("{task.fields[exceptions]:>7} exceptions"),
            TimeElapsedColumn(),
            console=console,
            disable=not enabled,
        )
        self.tasks: dict[str, TaskID] = {}

    def queued(self, run_id: uuid.UUID, input_path: str, size: int) -> None:
        console.print(f"run {run_id} queued for {escape(input_path)} ({size} bytes)")
        total = max(size, 1)
        for name in PHASES:
            self.tasks[name] = self.progress.add_task(name, total=total, rows=0, exceptions=0)
        self.progress.start()

    def phase(self, progress: PhaseProgress) -> None:
        task = self.tasks.get(progress.phase)
        if task is None:  # a phase this display does not know: leave it out
            return
        total = self.progress.tasks[task].total or 1
        self.progress.update(
            task,
            completed=total if progress.finished else min(progress.bytes_read, total),
            rows=max(progress.rows_in, progress.rows_out),  # ingest's rows come out of it
            exceptions=progress.exceptions,
        )

    def stop(self) -> None:
        self.progress.stop()


def run_document(done: HereRun, settings: Settings, cli_trace_id: str | None) -> dict[str, Any]:
    """What `run-pipeline` reports, as printed by --json."""
    from backend.pipeline.telemetry import run_trace_url

    run = done.run
    return {
        "run_id": str(run.id),
        "status": run.status.value,
        "outcome": done.outcome.value,
        "input_path": run.input_path,
        "uploaded": done.uploaded,
        "total_loans": run.total_loans,
        "eligible_loans": run.eligible_loans,
        "ineligible_loans": run.ineligible_loans,
        "rejected_loans": run.rejected_loans,
        "facts": done.facts,
        "exceptions": done.exceptions,
        "error_message": run.error_message,
        "phase_durations": run.phase_durations,
        "output_prefix": run.output_prefix,
        "trace_id": run.trace_id,
        "trace_url": run_trace_url(settings, run.trace_id),
        "cli_trace_id": cli_trace_id,
    }


@app.command("run-pipeline")
@traced
def run_pipeline(
    path: str = typer.Argument(
        ..., help="A local .csv or .csv.gz file (uploaded first), or a stored tape inputs/..."
    ),
    user: str | None = typer.Option(
        None, "--user", help="Record the run as started by this account (default: none)."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace a stored tape of the same name when uploading."
    ),
    as_json: bool = JsonOption,
) -> None:
    """Run the pipeline over a tape in this process, with a progress bar per phase.

    The run is queued and executed as the service's own runs are (same leases,
    same executor, its own trace, linked from this command's span). Prints run
    id, status, counts, trace id and URL. Exit 0 when the run completed, 1 when
    it failed (the message says why) or could not be started.
    """
    from backend.admin.service import execute_here
    from backend.errors import AppError
    from backend.models import RunStatus
    from backend.observability.trace_ids import current_trace_id

    settings = load_settings()
    local = Path(path)
    tape: Path | str
    if local.is_file():
        tape = local
    elif local.exists():
        raise fail(f"{path}: not a file")
    elif path.startswith("inputs/"):
        tape = path
    else:
        raise fail(f"{path}: no such file (a stored tape is named inputs/...)")
    bars = PhaseBars(enabled=not as_json)
    try:
        done = asyncio.run(
            execute_here(settings, tape, username=user, overwrite=overwrite, watcher=bars)
        )
    except AppError as exc:  # refused before the run started: path, upload, queue, user
        raise fail(exc.message) from None
    except DATABASE_ERRORS as exc:
        raise fail(f"database: {describe_error(exc)}") from None
    finally:
        bars.stop()
    document = run_document(done, settings, current_trace_id())
    if as_json:
        print_json(document)
    else:
        table = Table("Field", "Value", title="Pipeline run", show_header=False)
        table.add_row("Run", document["run_id"])
        table.add_row("Status", document["status"])
        table.add_row("Input", escape(document["input_path"]))
        table.add_row("Total loans", str(document["total_loans"]))
        table.add_row("Eligible", str(document["eligible_loans"]))
        table.add_row("Ineligible", str(document["ineligible_loans"]))
        table.add_row("Rejected", str(document["rejected_loans"]))
        table.add_row("Facts", str(document["facts"]))
        table.add_row("Exceptions", str(document["exceptions"]))
        if document["error_message"]:
            table.add_row("Error", escape(document["error_message"]))
        table.add_row("Trace id", document["trace_id"] or "-")
        table.add_row("Trace URL", document["trace_url"] or "-")
        results.print(table)
    if done.run.status is RunStatus.FAILED:
        raise fail(f"run {done.run.id} failed: {done.run.error_message}")
    if done.run.status is not RunStatus.COMPLETED:
        raise fail(f"run {done.run.id} did not finish here ({done.outcome.value})")


def settings_for_check() -> tuple[Settings | None, str | None]:
    """(settings to check with, why the real ones were refused).

    Refused for ENVIRONMENT (production's rules): the reason, and stand-in
    settings read from the same sources under development's rules, so the other
    checks still run. Invalid outright (a malformed value): no settings.
    """
    try:
        with warnings_held_for_logging() as early_warnings:
            settings = cli_settings(get_settings())
    except ConfigurationError as exc:
        # The stand-in's own warning (a random SECRET_KEY) is not about the real settings.
        with warnings_held_for_logging():
            settings = cli_settings(Settings(ENVIRONMENT="development"))
        configure_logging(settings, stream=_log_stream)
        return settings, str(exc)
    except ValidationError as exc:
        return None, f"invalid: {validation_reasons(exc)}"
    configure_logging(settings, stream=_log_stream)
    replay_warnings(early_warnings)
    return settings, None


VERDICT_STYLE = {"PASS": "green", "WARN": "yellow", "FAIL": "red"}


@app.command()
def check(
    timeout: float = typer.Option(
        5.0, "--timeout", min=0.1, max=60, help="Seconds each check may take."
    ),
    as_json: bool = JsonOption,
) -> None:
    """PASS / WARN / FAIL for settings, database, storage, rate-limit Redis, broker and
    OTLP collector. Checks run concurrently, each within --timeout. Exit 1 if any FAILs."""
    from backend.admin.checks import CheckResult, Verdict, overall, run_checks

    settings, refusal = settings_for_check()
    if settings is None:
        report([CheckResult("settings", Verdict.FAIL, refusal or "invalid")], as_json)
        raise fail("the settings are invalid")
    with command_span(settings, "check") as span:
        checks = asyncio.run(run_checks(settings, refusal, timeout))
        verdict = overall(checks)
        span.set_attribute("cli.check.verdict", verdict.value)
        report(checks, as_json)
        failed = [result.name for result in checks if result.verdict is Verdict.FAIL]
        if failed:
            raise fail(f"{len(failed)} check(s) failed: {', '.join(failed)}")


def report(checks: list[CheckResult], as_json: bool) -> None:
    """The check results on stdout: a table, or one JSON document."""
    from backend.admin.checks import overall

    verdict = overall(checks).value
    if as_json:
        print_json(
            {
                "status": verdict,
                "checks": [
                    {
                        "name": result.name,
                        "status": result.verdict.value,
                        "detail": result.detail,
                        "seconds": result.seconds,
                    }
                    for result in checks
                ],
            }
        )
        return
    table = Table("Check", "Status", "Detail", "Seconds", title="Loan Engine check")
    for result in checks:
        style = VERDICT_STYLE[result.verdict.value]
        table.add_row(
            result.name,
            f"[{style}]{result.verdict.value}[/{style}]",
            escape(result.detail),
            f"{result.seconds:.3f}",
        )
    results.print(table)
    results.print(f"Overall: [{VERDICT_STYLE[verdict]}]{verdict}[/{VERDICT_STYLE[verdict]}]")


if __name__ == "__main__":
    app()
