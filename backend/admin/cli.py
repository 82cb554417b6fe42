"""Operator commands: `python -m backend.admin.cli <command>`."""

from __future__ import annotations

import asyncio

import typer
from rich.console import Console

from backend.config import ConfigurationError, get_settings
from backend.database import Database

app = typer.Typer(help="Loan Engine administration commands.", no_args_is_help=True)
console = Console(stderr=True)


@app.command()
def migrate(revision: str = typer.Argument("head", help="Target revision.")) -> None:
    """Apply database migrations up to REVISION."""
    from backend.migrations.runner import upgrade

    upgrade(revision=revision)
    console.print(f"[green]database migrated to {revision}[/green]")


@app.command("seed-admin")
def seed_admin() -> None:
    """Create the admin from ADMIN_USERNAME / ADMIN_PASSWORD when no admin exists."""
    from backend.users.service import ensure_admin

    async def run() -> bool:
        settings = get_settings()
        database = Database(settings)
        try:
            async with database.session() as session:
                created = await ensure_admin(session, settings)
            return created is not None
        finally:
            await database.dispose()

    try:
        created = asyncio.run(run())
    except ConfigurationError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=1) from None
    console.print("admin created" if created else "an admin already exists; nothing to do")


if __name__ == "__main__":
    app()
