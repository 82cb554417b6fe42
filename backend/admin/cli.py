"""Operator commands: `python -m backend.admin.cli <command>`."""

from __future__ import annotations

import asyncio
from pathlib import Path

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


if __name__ == "__main__":
    app()
