"""Redaction: the rules (what is hidden, what stays readable), then what real servers write.

The end-to-end tests run `uvicorn backend.tests.redaction_app:app` at LOG_LEVEL=DEBUG with
DB_ECHO_QUERIES=true, on SQLite and on PostgreSQL, drive a whole scenario over HTTP and
read the server's stdout and the spans a real OTLP receiver got. Nothing here uses
structlog's `capture_logs`: it runs before the processors and cannot see redaction.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from backend.config import config_summary
from backend.migrations.runner import upgrade
from backend.observability.logging_config import configure_logging
from backend.observability.redaction import (
    REDACTED,
    RedactingSpanExporter,
    is_sensitive_key,
    record_exception,
    redact,
    redact_text,
)
from backend.pipeline.tape import generate_tape
from backend.tests import redaction_app
from backend.tests.conftest import ADMIN_PASSWORD, TEST_SECRET, bearer, make_settings
from backend.tests.hardening_support import app_client, server_env
from backend.tests.obs_helpers import ROOT, OtlpReceiver, Uvicorn, events, json_lines, wait_until

HIDDEN_KEYS = [
    "password",
    "new_password",
    "ADMIN_PASSWORD",
    "hashed_password",
    "passwd",
    "pwd",
    "db_pwd",
    "secret",
    "client_secret",
    "SECRET_KEY",
    "AWS_SECRET_ACCESS_KEY",
    "token",
    "access_token",
    "refreshToken",
    "METRICS_TOKEN",
    "jwt",
    "authorization",
    "Authorization",
    "proxy-authorization",
    "cookie",
    "Set-Cookie",
    "api_key",
    "apiKey",
    "X-Api-Key",
    "credentials",
    "private_key",
    "session_id",
]
READABLE_KEYS = [
    "ACCESS_TOKEN_EXPIRE_MINUTES",
    "token_type",
    "max_tokens",
    "password_min_length",
    "secretary",
    "SECRET_KEY_FILE",
    "RATE_LIMIT_KEY_PREFIX",
    "passwordless",
    "key",
    "tokens_used",
    "username",
    "generated_password_length",
]
# (text, the credential inside it)
HIDDEN_IN_TEXT = [
    ("login failed: password=hunter2 for bob", "hunter2"),
    ("retrying with pwd=s3cr3t-pwd", "s3cr3t-pwd"),
    ("got jwt=eyJhbGciOiJIUzI1NiJ9.e30.sig", "eyJhbGciOiJIUzI1NiJ9"),
    ("Authorization: Bearer abc.def-ghi_jkl", "abc.def-ghi_jkl"),
    ("header authorization: Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
    ("sent Bearer eyJhbGciOiJIUzI1NiJ9.e30.xyz upstream", "eyJhbGciOiJIUzI1NiJ9"),
    ('{"access_token": "tok-in-json", "token_type": "bearer"}', "tok-in-json"),
    ("postgresql+asyncpg://app:dsn-pass@db:5432/loans", "dsn-pass"),
    ("http://user:otel-secret@collector:4318/v1/traces", "otel-secret"),
    ("https://gh-token-value@github.com/org/repo.git", "gh-token-value"),
    ("postgresql://app@db/loans?sslmode=require&password=query-pass", "query-pass"),
    ("https://api.example.com/v1?user=jo&api_key=key-value-13&x=1", "key-value-13"),
    ("https://s3.example.com/obj?key=sig-key-value&Signature=sig-value", "sig-value"),
    ("https://api.example.com/cb?token=cb-token&secret=cb-secret", "cb-token"),
    (
        "(sqlalchemy.dialects.postgresql.asyncpg.IntegrityError) duplicate key\n"
        "[SQL: INSERT INTO users (email, hashed_password) VALUES ($1, $2)]\n"
        "[parameters: ('bob@example.com', '$2b$04$hashhashhash')]\n"
        "(Background on this error at: https://sqlalche.me/e/20/gkpj)",
        "$2b$04$hashhashhash",
    ),
]
READABLE_TEXT = [
    "token_type=bearer max_tokens=5 password_min_length=12",
    "Token refresh failed for user 7",
    "Basic validation passed",
    "the secretary: Ms Moneypenny",
    "see https://example.com/docs?page=2#section",
    "key (email)=(x) already exists",
]


class TestRules:
    @pytest.mark.parametrize("key", HIDDEN_KEYS)
    def test_keys_that_name_a_credential_are_hidden(self, key: str) -> None:
        assert is_sensitive_key(key)
        assert redact({key: "value-123"}) == {key: REDACTED}

    @pytest.mark.parametrize("key", READABLE_KEYS)
    def test_keys_that_only_mention_one_stay_readable(self, key: str) -> None:
        assert not is_sensitive_key(key)
        assert redact({key: "value-123"}) == {key: "value-123"}

    @pytest.mark.parametrize(("text", "secret"), HIDDEN_IN_TEXT)
    def test_credentials_inside_text_are_hidden(self, text: str, secret: str) -> None:
        hidden = redact_text(text)
        assert secret not in hidden
        assert REDACTED in hidden

    @pytest.mark.parametrize("text", READABLE_TEXT)
    def test_harmless_text_is_unchanged(self, text: str) -> None:
        assert redact_text(text) == text

    def test_structure_is_walked_and_flags_are_kept(self) -> None:
        value = {
            "outer": [{"client_secret": "s-1", "n": 2}, ("authorization", "Bearer t-1234567890")],
            "generated_password": True,
            "password": None,
            "dsn": b"postgresql://u:bytes-pass@h/db",
        }
        assert redact(value) == {
            "outer": [{"client_secret": REDACTED, "n": 2}, ("authorization", REDACTED)],
            "generated_password": True,
            "password": None,
            "dsn": f"postgresql://u:{REDACTED}@h/db",
        }

    def test_config_summary_masks_every_credential_form(self) -> None:
        settings = make_settings(
            DATABASE_URL="postgresql://app:db-pass-1@db/loans?password=db-pass-2&sslmode=require",
            OTEL_EXPORTER_OTLP_ENDPOINT="http://otel-user:otel-pass-3@collector:4318",
            RATE_LIMIT_STORAGE_URL="redis://:redis-pass-4@cache:6379/0",
            CELERY_BROKER_URL="sqs://AKIAEXAMPLE:aws-pass-5@",
            S3_ENDPOINT_URL="https://s3.local/?X-Amz-Signature=sig-pass-6",
            METRICS_TOKEN="metrics-pass-7",
        )
        summary = config_summary(settings)
        rendered = json.dumps(summary, default=str)
        for n in range(1, 8):
            assert f"pass-{n}" not in rendered, n
        assert summary["DATABASE_URL"] == (
            f"postgresql+asyncpg://app:{REDACTED}@db/loans?password={REDACTED}&sslmode=require"
        )
        assert (
            summary["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://otel-user:{REDACTED}@collector:4318"
        )
        assert summary["METRICS_TOKEN"] == REDACTED
        assert summary["SECRET_KEY"] == REDACTED and summary["ADMIN_PASSWORD"] == REDACTED
        assert summary["ACCESS_TOKEN_EXPIRE_MINUTES"] == 30
        assert summary["SECRET_KEY_FILE"] == "./var/secret_key"


class TestRenderedLines:
    def test_structlog_and_stdlib_lines_are_redacted_on_stdout(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        configure_logging(make_settings())
        capsys.readouterr()
        log = structlog.get_logger("backend.tests.rendered")
        log.info("rendered.keys", jwt="jwt-value-1", pwd="pwd-value-2", **redaction_app.HARMLESS)
        log.info("rendered.text", detail="retry with password=pw-value-3 and Bearer tok-value-4x")
        logging.getLogger("some.library").warning(
            "calling upstream with Authorization: Bearer %s", "tok-value-5x"
        )
        try:
            raise ValueError("connect postgresql://u:pw-value-6@db/x failed password=pw-value-7")
        except ValueError:
            log.exception("rendered.exception")
        output = capsys.readouterr().out
        for n in range(1, 8):
            assert f"value-{n}" not in output, n
        lines = json_lines(output)
        assert len(lines) == len(output.strip().splitlines())  # every line is JSON
        (keys,) = events(lines, "rendered.keys")
        assert keys["jwt"] == REDACTED and keys["pwd"] == REDACTED
        for key, value in redaction_app.HARMLESS.items():
            assert keys[key] == value, key

    def test_driver_loggers_never_write_parameters(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        configure_logging(make_settings(LOG_LEVEL="DEBUG", DB_ECHO_QUERIES=True))
        try:
            assert logging.getLogger("aiosqlite").getEffectiveLevel() >= logging.INFO
            assert logging.getLogger("asyncpg").getEffectiveLevel() >= logging.INFO
            assert logging.getLogger("sqlalchemy.engine").getEffectiveLevel() == logging.INFO
            capsys.readouterr()
            # Even a logger someone turned back to DEBUG is held by the handler's filter.
            logging.getLogger("aiosqlite").setLevel(logging.DEBUG)
            logging.getLogger("aiosqlite").debug("executing %s", ("borrower-B123",))
            logging.getLogger("sqlalchemy.engine.Engine").debug("Row %r", ("$2b$04$row",))
            logging.getLogger("sqlalchemy.engine.Engine").info("SELECT 1")
            output = capsys.readouterr().out
        finally:
            configure_logging(make_settings())
        assert "borrower-B123" not in output and "$2b$04$row" not in output
        assert [line["event"] for line in json_lines(output)] == ["SELECT 1"]


class TestSpans:
    def test_exported_spans_are_redacted(self) -> None:
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(RedactingSpanExporter(exporter)))
        tracer = provider.get_tracer("test")
        with tracer.start_as_current_span("op") as span:
            span.set_attribute("url.full", "https://x/cb?token=attr-secret-1&page=2")
            span.set_attribute("app.password", "attr-secret-2")
            span.set_attribute("app.token_type", "bearer")
            record_exception(span, RuntimeError("password=event-secret-3"))
            span.add_event("raw", {"detail": "Authorization: Bearer event-secret-4"})
            span.set_status(StatusCode.ERROR, "failed with pwd=status-secret-5")
        (finished,) = exporter.get_finished_spans()
        flat = repr(
            (
                finished.attributes,
                [(e.name, e.attributes) for e in finished.events],
                finished.status,
            )
        )
        flat += str(finished.status.description)
        for marker in ("attr-secret", "event-secret", "status-secret"):
            assert marker not in flat
        attributes = dict(finished.attributes or {})
        assert attributes["app.token_type"] == "bearer"
        assert attributes["url.full"] == f"https://x/cb?token={REDACTED}&page=2"


class TestAdminConfig:
    async def test_admin_config_masks_userinfo_and_password_query_parameters(
        self, clean_db: str, tmp_path: Path
    ) -> None:
        url = clean_db.replace("postgres@", "postgres:db-userinfo-pass@", 1)
        url += "?password=db-query-pass"
        async with app_client(
            DATABASE_URL=url,
            STORAGE_LOCAL_ROOT=str(tmp_path / "storage"),
            OTEL_TRACES_EXPORTER="none",
            OTEL_METRICS_EXPORTER="none",
            OTEL_EXPORTER_OTLP_ENDPOINT="http://otel-user:otel-userinfo-pass@collector:4318",
        ) as (_, client):
            login = await client.post(
                "/api/auth/login", data={"username": "admin", "password": ADMIN_PASSWORD}
            )
            token = login.json()["access_token"]
            response = await client.get("/admin/config", headers=bearer(token))
        assert response.status_code == 200
        for marker in ("db-userinfo-pass", "db-query-pass", "otel-userinfo-pass", TEST_SECRET):
            assert marker not in response.text
        config = response.json()
        assert config["DATABASE_URL"].endswith(f"?password={REDACTED}")
        assert f"otel-user:{REDACTED}@" in config["OTEL_EXPORTER_OTLP_ENDPOINT"]
        assert config["ACCESS_TOKEN_EXPIRE_MINUTES"] == 30


# ---------------------------------------------------------------- real servers

USER_PASSWORD = "user-pw-marker-Hq27xLm"
WRONG_PASSWORD = "wrong-pw-marker-Qa55Zr"
QUERY_TOKEN = "query-token-marker-Lp09"
OTEL_USERINFO_PASSWORD = "otel-pass-marker-Yt66"


def tape_with_borrowers() -> tuple[bytes, list[str]]:
    """A small generated tape and the borrower ids in it."""
    rows = list(generate_tape(40, seed=11))
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    index = list(rows[0]).index("borrower_id")
    borrowers = [str(row[index]) for row in rows[1:] if len(row) > index and row[index]]
    return out.getvalue().encode(), borrowers


def run_scenario(base_url: str) -> list[str]:
    """Register, log in, promote, upload, run the pipeline, admin calls, a DB error, two
    500s, a harmless line; returns every credential the server must never write."""
    with httpx.Client(base_url=base_url, timeout=30) as client:
        registered = client.post(
            "/api/auth/register",
            json={
                "username": "leaky",
                "email": "leaky@example.com",
                "password": USER_PASSWORD,
            },
        )
        assert registered.status_code == 202, registered.text
        bad = client.post("/api/auth/login", data={"username": "leaky", "password": WRONG_PASSWORD})
        assert bad.status_code == 401
        admin_token = client.post(
            "/api/auth/login", data={"username": "admin", "password": ADMIN_PASSWORD}
        ).json()["access_token"]
        admin = bearer(admin_token)
        # Registration answers alike for new and taken names: the id comes from the admin list.
        users = client.get("/api/users", params={"limit": 100}, headers=admin).json()["items"]
        (leaky_id,) = [u["id"] for u in users if u["username"] == "leaky"]
        promoted = client.patch(f"/api/users/{leaky_id}", json={"role": "analyst"}, headers=admin)
        assert promoted.status_code == 200, promoted.text
        user_token = client.post(
            "/api/auth/login", data={"username": "leaky", "password": USER_PASSWORD}
        ).json()["access_token"]
        user = bearer(user_token)
        assert client.get("/api/auth/me", params={"token": QUERY_TOKEN}, headers=user).is_success

        content, _ = tape_with_borrowers()
        uploaded = client.post(
            "/api/files/upload", files={"file": ("tape.csv", content, "text/csv")}, headers=user
        )
        assert uploaded.status_code == 201, uploaded.text
        started = client.post(
            "/api/pipeline/run", json={"input_path": uploaded.json()["path"]}, headers=user
        )
        assert started.status_code == 202, started.text
        run_id = started.json()["run_id"]

        def finished() -> bool:
            run = client.get(f"/api/pipeline/runs/{run_id}", headers=user).json()
            return run["status"] in ("completed", "failed", "interrupted")

        wait_until(finished, 60, "the pipeline run")
        assert client.get(f"/api/pipeline/runs/{run_id}", headers=user).json()["status"] == (
            "completed"
        )
        facts = client.get(f"/api/pipeline/runs/{run_id}/facts", headers=user)
        assert facts.status_code == 200

        for path in ("/admin/config", "/admin/metrics", "/admin/info", "/admin/health/detailed"):
            assert client.get(path, headers=admin).status_code == 200, path
        # SQLite says OperationalError (503), PostgreSQL ProgrammingError (500).
        assert client.get("/api/test/db-error", headers=user).status_code in (500, 503)
        assert client.get("/api/test/leaky-crash", headers=user).status_code == 500
        assert client.get("/_test/crash").status_code == 500
        assert client.get("/api/test/harmless").status_code == 200
    return [admin_token, user_token, f"Bearer {user_token}", f"Bearer {admin_token}"]


def assert_nothing_leaked(output: str, receiver: OtlpReceiver, secrets: list[str]) -> None:
    _, borrowers = tape_with_borrowers()
    markers = [
        *secrets,
        USER_PASSWORD,
        WRONG_PASSWORD,
        ADMIN_PASSWORD,
        TEST_SECRET,
        QUERY_TOKEN,
        OTEL_USERINFO_PASSWORD,
        redaction_app.DB_PARAMETER,
        redaction_app.CRASH_PASSWORD,
        redaction_app.CRASH_BEARER,
        "$2b$",  # any bcrypt hash
        "eyJhbGci",  # any JWT
    ]
    spans = [span for _, span in receiver.spans()]
    assert spans, "no spans were exported"
    exported = "\n".join(str(span) for span in spans)
    for marker in markers:
        assert marker not in output, marker
        assert marker not in exported, marker
    for borrower in borrowers:
        assert borrower not in output, borrower
        assert borrower not in exported, borrower

    lines = output.strip().splitlines()
    assert lines
    for line in lines:
        assert isinstance(json.loads(line), dict), line  # every stdout line is one JSON object
    parsed = json_lines(output)
    # The statements were logged (DB_ECHO_QUERIES), once each, as JSON, without values.
    statements = [line for line in parsed if line.get("logger") == "sqlalchemy.engine.Engine"]
    assert any("INSERT INTO users" in line["event"] for line in statements)
    (harmless,) = events(parsed, "redaction.harmless")
    for key, value in redaction_app.HARMLESS.items():
        assert harmless[key] == value, key
    (summary,) = events(parsed, "config.summary")
    assert summary["ACCESS_TOKEN_EXPIRE_MINUTES"] == 30
    assert f":{REDACTED}@" in summary["OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert summary["SECRET_KEY"] == REDACTED
    # The failures were still logged and traced, just without their secrets.
    assert events(parsed, "http.unhandled_exception")
    harmless_spans = [
        span for span in spans if any(a.key == "app.token_type" for a in span.attributes)
    ]
    assert harmless_spans
    attributes = {a.key: a.value for a in harmless_spans[0].attributes}
    assert attributes["app.token_type"].string_value == "bearer"
    assert attributes["app.max_tokens"].int_value == 5
    assert attributes["app.password"].string_value == REDACTED


@pytest.fixture
def otlp() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


def scenario_env(receiver: OtlpReceiver, tmp_path: Path, database_url: str) -> dict[str, str]:
    endpoint = receiver.endpoint.replace("://", f"://otel-user:{OTEL_USERINFO_PASSWORD}@", 1)
    return server_env(
        DATABASE_URL=database_url,
        STORAGE_LOCAL_ROOT=str(tmp_path / "storage"),
        LOG_LEVEL="DEBUG",
        DB_ECHO_QUERIES="true",
        OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_METRICS_EXPORTER="none",
        DB_SLOW_QUERY_MS="0",  # every statement is "slow": its text is logged too
    )


def serve_scenario(env: dict[str, str]) -> tuple[str, list[str]]:
    with Uvicorn(env, app="backend.tests.redaction_app:app") as server:
        secrets = run_scenario(server.base_url)
    return server.output, secrets


class TestRealServer:
    def test_debug_scenario_on_sqlite_leaks_nothing(
        self, otlp: OtlpReceiver, tmp_path: Path
    ) -> None:
        url = f"sqlite+aiosqlite:///{tmp_path / 'scenario.db'}"
        upgrade(url)
        output, secrets = serve_scenario(scenario_env(otlp, tmp_path, url))
        assert_nothing_leaked(output, otlp, secrets)

    def test_debug_scenario_on_postgresql_leaks_nothing(
        self, otlp: OtlpReceiver, tmp_path: Path, clean_db: str
    ) -> None:
        output, secrets = serve_scenario(scenario_env(otlp, tmp_path, clean_db))
        assert_nothing_leaked(output, otlp, secrets)

    def test_sigterm_line_is_logged_in_a_clean_context(self, tmp_path: Path, clean_db: str) -> None:
        env = server_env(DATABASE_URL=clean_db, STORAGE_LOCAL_ROOT=str(tmp_path / "storage"))
        server = Uvicorn(env, app="backend.tests.redaction_app:app")
        with server:
            assert server.process is not None
            response = httpx.get(
                f"{server.base_url}/api/test/terminate",
                headers={"X-Request-ID": "req-during-sigterm"},
                timeout=30,
            )
            assert response.json() == {"status": "signalled"}
            assert server.process.wait(timeout=30) == 0
        lines = json_lines(server.output)
        (draining,) = events(lines, "app.draining")
        for key in ("request_id", "user", "run_id", "trace_id", "span_id", "route", "method"):
            assert key not in draining, key
        (closed,) = events(lines, "app.listener.closed")
        assert "request_id" not in closed and "user" not in closed
        # The request itself kept its context: the signal did not take it away.
        (access,) = events(lines, "http.request.completed", route="/api/test/terminate")
        assert access["request_id"] == "req-during-sigterm"


class TestDevelopmentKey:
    def test_processes_started_one_after_the_other_and_workers_share_the_key(
        self, tmp_path: Path
    ) -> None:
        url = f"sqlite+aiosqlite:///{tmp_path / 'dev.db'}"
        upgrade(url)
        key_file = tmp_path / "var" / "secret_key"
        env = server_env(
            ENVIRONMENT="development",
            SECRET_KEY="",
            SECRET_KEY_FILE=str(key_file),
            DATABASE_URL=url,
            STORAGE_LOCAL_ROOT=str(tmp_path / "storage"),
        )
        with Uvicorn(env, workers=2) as first:
            token = httpx.post(
                f"{first.base_url}/api/auth/login",
                data={"username": "admin", "password": ADMIN_PASSWORD},
            ).json()["access_token"]
            # New connections, spread by the kernel over both workers.
            statuses = [
                httpx.get(f"{first.base_url}/api/auth/me", headers=bearer(token)).status_code
                for _ in range(20)
            ]
        assert statuses == [200] * 20
        assert len(events(json_lines(first.output), "app.started")) == 2
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert [p.name for p in key_file.parent.iterdir()] == ["secret_key"]
        key = key_file.read_text()

        with Uvicorn(env) as second:  # a restart
            me = httpx.get(f"{second.base_url}/api/auth/me", headers=bearer(token))
        assert me.status_code == 200 and me.json()["username"] == "admin"
        assert key_file.read_text() == key
        assert key.strip() not in first.output + second.output


def test_cli_db_status_masks_the_database_url(clean_db: str, tmp_path: Path) -> None:
    url = clean_db.replace("postgres@", "postgres:cli-userinfo-pass@", 1)
    env = server_env(DATABASE_URL=url + "?password=cli-query-pass")
    result = subprocess.run(
        [sys.executable, "-m", "backend.admin.cli", "db-status", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert "cli-userinfo-pass" not in output and "cli-query-pass" not in output
    document = json.loads(result.stdout)
    assert document["reachable"] is True
    assert document["url"].endswith(f"?password={REDACTED}")
    assert f"postgres:{REDACTED}@" in document["url"]
