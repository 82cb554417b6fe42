"""Operator commands: `python -m backend.admin.cli <command>`.

Results (tables, `--json` documents) go to stdout; messages and errors go to
stderr, and so do log lines (JSON, as the service writes them), so `--json`
output can be piped as is. Exit codes: 0 done, 1 failed (database unreachable,
conflict, not at the migration head), 2 bad usage.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from backend.config import ConfigurationError, Settings, get_settings
from backend.database import Database
from backend.models import Role
from backend.observability.logging_config import (
    configure_logging,
    redact_text,
    replay_warnings,
    warnings_held_for_logging,
)

T = TypeVar("T")

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


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print one `error:` line on stderr; raise the returned exception to exit with `code`."""
    console.print(f"[red]error:[/red] {escape(message)}")
    return typer.Exit(code=code)


def load_settings() -> Settings:
    """The process settings, with logging configured from them (JSON lines on stderr).

    An invalid configuration is one clear line and exit 1, not a traceback.
    """
    try:
        with warnings_held_for_logging() as early_warnings:
            settings = get_settings()
    except (ConfigurationError, ValidationError) as exc:
        raise fail(f"configuration: {exc}") from None
    configure_logging(settings, stream=sys.stderr)
    replay_warnings(early_warnings)
    return settings


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
def create_user(
    username: str = typer.Argument(..., help="3-50 characters: letters, digits, . _ -"),
    email: str = typer.Argument(..., help="Email address (stored lower-case)."),
    role: Role = typer.Option(Role.VIEWER, "--role", help="Role of the new account."),
    password_stdin: bool = typer.Option(
        False, "--password-stdin", help="Read the password from the first line of stdin."
    ),
) -> None:
    """Create an account; the password is prompted for (twice) unless --password-stdin."""
    from backend.auth.schemas import RegisterRequest
    from backend.errors import Conflict
    from backend.users.service import create_user as create

    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    try:
        data = RegisterRequest(username=username, email=email, password=password)
    except ValidationError as exc:
        # Field names and reasons only: the rejected values (the password) are never echoed.
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}" for error in exc.errors()
        )
        raise fail(problems, code=2) from None
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


if __name__ == "__main__":
    app()
