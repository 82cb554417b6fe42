"""The operator commands reset-password, run-pipeline and check, run as an operator runs
them: separate processes on the test database, prompts driven through a real terminal."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from backend.auth.schemas import RegisterRequest
from backend.auth.service import authenticate
from backend.config import Settings
from backend.database import Database
from backend.errors import Unauthorized
from backend.models import PipelineRun, Role
from backend.tests.conftest import TEST_BROKER_URL, TEST_REDIS_URL, TEST_SECRET, make_settings
from backend.tests.obs_helpers import OtlpReceiver, free_port, json_lines
from backend.tests.pipeline_support import FIXTURES, KNOWN_TAPE
from backend.users.service import create_user

ROOT = Path(__file__).resolve().parents[2]
OLD_PASSWORD = "old-password-long-enough"
NEW_PASSWORD = "Fresh-Pa55word-nobody-guesses"
PROMPT_DEADLINE = 60.0


def operator_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a CLI process sharing `settings`' database and storage, with
    nothing configured that the test does not ask for (no Redis, broker or collector)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("OTEL_", "RATE_LIMIT_", "PIPELINE_", "CELERY_", "STORAGE_"))
    }
    env.update(
        {
            "ENVIRONMENT": "test",
            "SECRET_KEY": TEST_SECRET,
            "DATABASE_URL": settings.DATABASE_URL,
            "STORAGE_LOCAL_ROOT": settings.STORAGE_LOCAL_ROOT,
            "BCRYPT_ROUNDS": "4",
            "ADMIN_USERNAME": settings.ADMIN_USERNAME,
            "RUNTIME_GC_TUNING": "false",
        }
    )
    env.update(extra)
    return env


def cli(*args: str, env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "backend.admin.cli", *args],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def in_terminal(
    args: list[str], env: dict[str, str], answers: list[tuple[str, str]]
) -> tuple[int, str]:
    """Run the CLI with a pseudo-terminal as its controlling terminal (so hidden prompts
    go through /dev/tty, with echo off, as for a person), typing each answer once its
    prompt is complete. Returns the exit code and everything the terminal showed.

    A prompt is complete with the space getpass writes after turning echo off (and
    flushing what was typed before): answering earlier would be thrown away.
    """
    pid, fd = pty.fork()
    if pid == 0:  # the child: become the CLI
        os.chdir(ROOT)
        os.execve(sys.executable, [sys.executable, "-m", "backend.admin.cli", *args], env)  # noqa: S606
    shown = b""
    try:
        for prompt, answer in answers:
            seen = len(shown)
            while f"{prompt}: ".encode() not in shown[seen:]:
                chunk = _read(fd)
                if not chunk:
                    raise AssertionError(f"no prompt {prompt!r}; the terminal showed {shown!r}")
                shown += chunk
            os.write(fd, answer.encode() + b"\n")
        while chunk := _read(fd):
            shown += chunk
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        raise
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), shown.decode("utf-8", "replace")


def _read(fd: int) -> bytes:
    """What the terminal shows next; b"" once the child has gone (or after the deadline)."""
    ready, _, _ = select.select([fd], [], [], PROMPT_DEADLINE)
    if not ready:
        return b""
    try:
        return os.read(fd, 4096)
    except OSError:  # EIO: the child closed the terminal
        return b""


async def add_user(settings: Settings, username: str, role: Role = Role.ANALYST) -> None:
    database = Database(settings)
    try:
        async with database.session() as session:
            data = RegisterRequest(
                username=username, email=f"{username}@example.com", password=OLD_PASSWORD
            )
            await create_user(session, settings, data, role)
    finally:
        await database.dispose()


async def can_sign_in(settings: Settings, username: str, password: str) -> bool:
    """Through the service's own credential check (the one POST /api/auth/login uses)."""
    database = Database(settings)
    try:
        async with database.session() as session:
            await authenticate(session, settings, username, password)
    except Unauthorized:
        return False
    finally:
        await database.dispose()
    return True


async def stored_run(settings: Settings, run_id: str) -> PipelineRun:
    database = Database(settings)
    try:
        async with database.session() as session:
            run = await session.get(PipelineRun, uuid.UUID(run_id))
    finally:
        await database.dispose()
    assert run is not None
    return run


def assert_secret_absent(result: subprocess.CompletedProcess[str], secret: str) -> None:
    assert secret not in result.stdout
    assert secret not in result.stderr
    for line in json_lines(result.stderr):
        assert secret not in json.dumps(line)


# ------------------------------------------------------------------ reset-password


async def test_reset_password_from_stdin(settings: Settings) -> None:
    await add_user(settings, "alice")
    result = cli(
        "reset-password", "alice", "--password-stdin",
        env=operator_env(settings), stdin=NEW_PASSWORD + "\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "password changed for alice" in result.stderr
    assert_secret_absent(result, NEW_PASSWORD)
    logged = [line for line in json_lines(result.stderr) if line["event"] == "user.password_reset"]
    assert len(logged) == 1 and logged[0]["service"] == "loan-engine-cli"
    assert await can_sign_in(settings, "alice", NEW_PASSWORD)
    assert not await can_sign_in(settings, "alice", OLD_PASSWORD)


async def test_reset_password_at_hidden_prompts(settings: Settings) -> None:
    await add_user(settings, "bob")
    code, shown = in_terminal(
        ["reset-password", "bob"],
        operator_env(settings),
        [("New password", NEW_PASSWORD), ("Repeat the new password", NEW_PASSWORD)],
    )
    assert code == 0, shown
    assert "password changed for bob" in shown
    assert NEW_PASSWORD not in shown  # echo was off, and nothing printed or logged it
    assert await can_sign_in(settings, "bob", NEW_PASSWORD)


async def test_reset_password_entries_that_differ_change_nothing(settings: Settings) -> None:
    await add_user(settings, "carol")
    code, shown = in_terminal(
        ["reset-password", "carol"],
        operator_env(settings),
        [("New password", NEW_PASSWORD), ("Repeat the new password", NEW_PASSWORD + "x")],
    )
    assert code == 2, shown
    assert "the two passwords differ; nothing was changed" in shown
    assert NEW_PASSWORD not in shown
    assert await can_sign_in(settings, "carol", OLD_PASSWORD)


async def test_reset_password_policy_is_the_apis(settings: Settings) -> None:
    await add_user(settings, "dave")
    short = "short-pw-11"  # 11 characters: the API's registration refuses it too
    result = cli(
        "reset-password", "dave", "--password-stdin", env=operator_env(settings), stdin=short
    )
    assert result.returncode == 2
    assert "error: password: String should have at least 12 characters" in result.stderr
    assert_secret_absent(result, short)
    assert await can_sign_in(settings, "dave", OLD_PASSWORD)


async def test_reset_password_unknown_user(settings: Settings) -> None:
    result = cli(
        "reset-password", "ghost", "--password-stdin",
        env=operator_env(settings), stdin=NEW_PASSWORD + "\n",
    )  # fmt: skip
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: no user named 'ghost'"]
    assert "Traceback" not in result.stderr
    assert_secret_absent(result, NEW_PASSWORD)


# -------------------------------------------------------------------- run-pipeline


async def test_run_pipeline_local_tape_as_the_api_sees_it(
    settings: Settings,
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    tmp_path: Path,
) -> None:
    tape = tmp_path / "known.csv"
    tape.write_bytes(KNOWN_TAPE)
    result = cli("run-pipeline", str(tape), "--user", "admin", "--json", env=operator_env(settings))
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    assert document["status"] == "completed"
    # Uploaded into the named user's own scope, as the API's upload would.
    admin_id = (await client.get("/api/auth/me", headers=admin_headers)).json()["id"]
    assert document["input_path"] == f"inputs/user-{admin_id}/known.csv"
    assert document["uploaded"] is True
    counts = ("total_loans", "eligible_loans", "ineligible_loans", "rejected_loans")
    assert [document[key] for key in counts] == [14, 4, 6, 4]
    assert (document["facts"], document["exceptions"]) == (10, 12)
    trace_id = document["trace_id"]
    assert len(trace_id) == 32 and int(trace_id, 16)
    assert document["trace_url"] == f"http://localhost:16686/trace/{trace_id}"
    assert document["cli_trace_id"] != trace_id  # the run has a trace of its own

    # The same run through the API: same row, same counts, same trace.
    run_id = document["run_id"]
    read = await client.get(f"/api/pipeline/runs/{run_id}", headers=admin_headers)
    assert read.status_code == 200
    body = read.json()
    assert [body[key] for key in counts] == [14, 4, 6, 4]
    assert (body["status"], body["exception_count"], body["trace_id"]) == (
        "completed",
        12,
        trace_id,
    )
    assert body["created_by"] is not None
    for listing, total in (("facts", 10), ("exceptions", 12)):
        page = await client.get(f"/api/pipeline/runs/{run_id}/{listing}", headers=admin_headers)
        assert page.json()["total"] == total
    # The run's own log lines carry its trace id.
    started = [e for e in json_lines(result.stderr) if e["event"] == "pipeline.run.started"]
    assert started and started[0]["trace_id"] == trace_id


async def test_run_pipeline_table_and_stored_path(settings: Settings, tmp_path: Path) -> None:
    storage_inputs = Path(settings.STORAGE_LOCAL_ROOT) / "inputs"
    storage_inputs.mkdir(parents=True)
    (storage_inputs / "stored.csv").write_bytes(KNOWN_TAPE)
    result = cli("run-pipeline", "inputs/stored.csv", env=operator_env(settings))
    assert result.returncode == 0, result.stderr
    assert "Status      │ completed" in result.stdout
    assert "Facts       │ 10" in result.stdout and "Exceptions  │ 12" in result.stdout
    trace_id = result.stdout.split("Trace id    │ ")[1].split()[0]
    run_id = result.stdout.split("Run         │ ")[1].split()[0]
    assert (await stored_run(settings, run_id)).trace_id == trace_id
    # One progress bar per phase, each finished.
    for phase in ("ingest", "validate", "normalize", "enrich", "eligibility", "persist", "report"):
        assert any(
            line.startswith(phase) and "100%" in line for line in result.stderr.splitlines()
        ), phase

    missing = cli("run-pipeline", "inputs/absent.csv", env=operator_env(settings))
    assert missing.returncode == 1
    assert "error: File not found" in missing.stderr
    nowhere = cli("run-pipeline", str(tmp_path / "absent.csv"), env=operator_env(settings))
    assert nowhere.returncode == 1
    assert "no such file" in nowhere.stderr


async def test_run_pipeline_bad_tape_fails_with_its_message(
    settings: Settings, tmp_path: Path
) -> None:
    lines = KNOWN_TAPE.decode().splitlines()
    header = lines[0].replace(",credit_score", "").replace(",state", "")
    tape = tmp_path / "short.csv"
    tape.write_text(header + "\nL1,B1,1,2\n")
    result = cli("run-pipeline", str(tape), "--json", env=operator_env(settings))
    assert result.returncode == 1
    document = json.loads(result.stdout)
    message = "The tape is missing required columns: credit_score, state"
    assert (document["status"], document["error_message"]) == ("failed", message)
    assert (document["facts"], document["exceptions"]) == (0, 0)
    assert f"error: run {document['run_id']} failed: {message}" in result.stderr
    run = await stored_run(settings, document["run_id"])
    assert run.status.value == "failed"
    assert run.trace_id == document["trace_id"] is not None


async def test_run_pipeline_traces_at_a_collector(settings: Settings) -> None:
    with OtlpReceiver() as receiver:
        env = operator_env(settings, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint)
        gz = FIXTURES / "known_tape.csv"
        result = cli("run-pipeline", str(gz), "--json", env=env)
        # The CLI flushed before it exited: everything is at the receiver already.
        spans = list(receiver.spans())
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    commands = [s for r, s in spans if s.name == "cli run-pipeline"]
    assert len(commands) == 1
    command = commands[0]
    resources = {r["service.name"] for r, s in spans}
    assert resources == {"loan-engine-cli"}
    assert command.trace_id.hex() == document["cli_trace_id"]
    attributes = {a.key: a.value for a in command.attributes}
    assert attributes["pipeline.run_id"].string_value == document["run_id"]
    assert attributes["pipeline.run.trace_id"].string_value == document["trace_id"]
    assert attributes["process.exit.code"].int_value == 0
    # The run's trace is its own, and its root links back to the command's span.
    roots = [s for r, s in spans if s.name == "pipeline.run"]
    assert len(roots) == 1
    root = roots[0]
    assert root.trace_id.hex() == document["trace_id"]
    assert [(link.trace_id, link.span_id) for link in root.links] == [
        (command.trace_id, command.span_id)
    ]
    phases = {s.name for r, s in spans if s.trace_id == root.trace_id}
    assert {f"pipeline.phase.{p}" for p in ("ingest", "persist", "report")} <= phases


# --------------------------------------------------------------------------- check


def check_rows(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    document = json.loads(result.stdout)
    return {row["name"]: row for row in document["checks"]}


async def test_check_everything_configured_passes(settings: Settings) -> None:
    with OtlpReceiver() as receiver:
        env = operator_env(
            settings,
            ENVIRONMENT="production",
            RATE_LIMIT_STORAGE_URL=TEST_REDIS_URL,
            PIPELINE_EXECUTOR="celery",
            CELERY_BROKER_URL=TEST_BROKER_URL,
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
        )
        result = cli("check", "--json", env=env)
        spans = list(receiver.spans())
    assert result.returncode == 0, result.stdout + result.stderr
    rows = check_rows(result)
    assert list(rows) == [
        "settings", "database", "storage", "rate-limit storage", "broker", "otlp collector",
    ]  # fmt: skip
    assert {name: row["status"] for name, row in rows.items()} == dict.fromkeys(rows, "PASS")
    assert json.loads(result.stdout)["status"] == "PASS"
    assert "at head" in rows["database"]["detail"]
    assert "accepts traces" in rows["otlp collector"]["detail"]
    # The probe left nothing behind in storage.
    assert list((Path(settings.STORAGE_LOCAL_ROOT) / "inputs").iterdir()) == []
    commands = [(r, s) for r, s in spans if s.name == "cli check"]
    assert len(commands) == 1
    resource, span = commands[0]
    assert resource["service.name"] == "loan-engine-cli"
    attributes = {a.key: a.value for a in span.attributes}
    assert attributes["cli.check.verdict"].string_value == "PASS"


async def test_check_warns_for_what_is_not_configured(settings: Settings) -> None:
    # No SECRET_KEY: fine for a test process (a random one), refused in production.
    result = cli("check", env=operator_env(settings, SECRET_KEY=""))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if "│" in line}
    assert "WARN" in lines["settings"] and "SECRET_KEY is not set" in lines["settings"]
    assert "WARN" in lines["rate-limit storage"]
    assert "WARN" in lines["otlp collector"]
    assert "PASS" in lines["database"] and "PASS" in lines["storage"]
    assert "PASS" in lines["broker"] and "not used" in lines["broker"]
    assert "Overall: WARN" in result.stdout


async def test_check_fails_fast_on_a_closed_database_port(settings: Settings) -> None:
    closed = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/nothing"
    env = operator_env(
        settings, DATABASE_URL=closed, RATE_LIMIT_STORAGE_URL="redis://127.0.0.1:1/0"
    )
    started = time.monotonic()
    result = cli("check", "--timeout", "3", env=env)
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert elapsed < 30  # interpreter start-up included; the checks themselves stop at 3 s
    lines = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if "│" in line}
    assert "FAIL" in lines["database"] and "unreachable" in lines["database"]
    assert "FAIL" in lines["rate-limit storage"]
    assert "PASS" in lines["storage"]
    assert "Overall: FAIL" in result.stdout
    assert "error: 2 check(s) failed: database, rate-limit storage" in result.stderr


async def test_check_reports_a_refused_production_config(settings: Settings) -> None:
    env = operator_env(settings, ENVIRONMENT="production", SECRET_KEY="too-short", DEBUG="true")
    result = cli("check", "--json", env=env)
    assert result.returncode == 1
    rows = check_rows(result)
    assert rows["settings"]["status"] == "FAIL"
    assert "SECRET_KEY must be at least 32 characters" in rows["settings"]["detail"]
    assert "DEBUG must be off" in rows["settings"]["detail"]
    # The rest still ran, on the same database and storage.
    assert rows["database"]["status"] == "PASS"
    assert "too-short" not in result.stdout + result.stderr


@pytest.mark.parametrize("command", ["list-users", "run-stats"])
def test_existing_commands_are_traced(command: str, tmp_path: Path) -> None:
    settings = make_settings(
        DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}",
        STORAGE_LOCAL_ROOT=str(tmp_path / "storage"),
    )
    with OtlpReceiver() as receiver:
        env = operator_env(settings, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint)
        assert cli("migrate", env=env).returncode == 0
        result = cli(command, env=env)
        spans = list(receiver.spans())
    assert result.returncode == 0, result.stderr
    names = [(r["service.name"], s.name) for r, s in spans if s.name.startswith("cli ")]
    assert names == [("loan-engine-cli", "cli migrate"), ("loan-engine-cli", f"cli {command}")]
