"""Dependencies that refuse, hang or reset, between real server processes and the
real PostgreSQL, Redis, broker and OTLP receiver (backend/tests/fault_proxy.py).

Every figure asserted here is a bound the README's "Failure behaviour" table
states; each test prints what it measured (run with -s to see them).
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import make_url

from backend.tests.conftest import ADMIN_PASSWORD, TEST_REDIS_URL
from backend.tests.fault_proxy import FaultProxy
from backend.tests.obs_helpers import OtlpReceiver
from backend.tests.pipeline_support import KNOWN_TAPE
from backend.tests.worker_support import (
    Process,
    api_server,
    wait_for,
    wait_ready,
)

# Small bounds so that the faults show within seconds.
DB_TIMEOUT = 1.0
RECOVERY = 2.0
FAILURES = 3
BREAKER_ENV = {
    "CIRCUIT_FAILURE_THRESHOLD": str(FAILURES),
    "CIRCUIT_RECOVERY_SECONDS": str(RECOVERY),
    "HEALTH_CHECK_TIMEOUT": "1",
}
# Time a request may take on top of the bound under test: process, loopback, a noisy host.
SLACK = 0.75


@contextmanager
def proxied(url: str) -> Iterator[tuple[FaultProxy, str]]:
    """A fault proxy in front of the server of `url`, and `url` pointed at it."""
    parsed = make_url(url)
    with FaultProxy(parsed.host or "127.0.0.1", parsed.port or 0) as proxy:
        yield (
            proxy,
            parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False),
        )


def timed(client: httpx.Client, method: str, path: str, **kwargs: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    response = client.request(method, path, **kwargs)
    return time.perf_counter() - started, response


def signed_in(url: str) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=30)
    response = client.post(
        "/api/auth/login", data={"username": "admin", "password": ADMIN_PASSWORD}
    )
    assert response.status_code == 200, response.text
    client.headers["Authorization"] = f"Bearer {response.json()['access_token']}"
    return client


def envelope_code(response: Any) -> str:
    body = response.json()
    assert set(body) == {"error"}, body
    return str(body["error"]["code"])


def circuit_lines(server: Process, dependency: str) -> list[str]:
    return [
        line["event"]
        for line in server.lines()
        if line.get("event", "").startswith("circuit.") and line.get("dependency") == dependency
    ]


def test_database_black_holed_fails_fast_then_at_once_and_recovers(
    clean_db: str, tmp_path: Path
) -> None:
    env = {
        **BREAKER_ENV,
        "DB_COMMAND_TIMEOUT_SECONDS": str(DB_TIMEOUT),
        "DB_CONNECT_TIMEOUT_SECONDS": str(DB_TIMEOUT),
    }
    with (
        proxied(clean_db) as (proxy, url),
        api_server(tmp_path, "api", DATABASE_URL=url, **env) as server,
    ):
        client = signed_in(wait_ready(server))
        assert client.get("/api/auth/me").status_code == 200

        proxy.black_hole()
        # Until the breaker opens, each call waits for the database timeouts, no longer.
        first = [timed(client, "GET", "/api/auth/me") for _ in range(FAILURES)]
        # Then every call is refused without touching the database.
        refused = [timed(client, "GET", "/api/auth/me") for _ in range(10)]
        ready_took, ready = timed(client, "GET", "/health/ready")

        for _took, response in first + refused:
            assert response.status_code == 503, response.text
            assert envelope_code(response) == "service_unavailable"
            assert int(response.headers["retry-after"]) >= 1
        # A pooled connection's pre-ping times out, then the reconnect does: at most both.
        assert max(took for took, _ in first) < 2 * DB_TIMEOUT + SLACK, first
        refused_ms = statistics.median(took for took, _ in refused) * 1000
        assert refused_ms < 50, refused_ms
        assert refused[-1][1].json()["error"]["details"]["dependency"] == "database"
        assert ready.status_code == 503 and ready_took < 1 + SLACK
        assert ready.json()["components"]["database"]["status"] == "unhealthy"
        assert ready.json()["circuits"]["database"]["state"] in ("open", "half_open")

        proxy.heal()
        healed_at = time.monotonic()
        wait_for(lambda: client.get("/health/ready").status_code == 200, "readiness after heal")
        wait_for(lambda: client.get("/api/auth/me").status_code == 200, "the API after heal")
        recovered = time.monotonic() - healed_at
        assert server.process is not None and server.process.poll() is None  # no restart
        circuit = client.get("/admin/metrics").json()["circuits"]["database"]
        assert (circuit["state"], circuit["opened_total"]) == ("closed", 1), circuit
        assert circuit["refused_total"] >= len(refused)
        # One warning for the outage, however many probes failed; one line when closed.
        lines = circuit_lines(server, "database")
        assert lines[0] == "circuit.opened" and lines.count("circuit.opened") == 1, lines
        assert lines[-1] == "circuit.closed" and lines.count("circuit.closed") == 1, lines
        print(
            f"\ndatabase black-holed: first calls {[round(t, 2) for t, _ in first]} s, "
            f"then {refused_ms:.1f} ms (median), readiness {ready_took:.2f} s, "
            f"recovered {recovered:.2f} s after heal"
        )
        client.close()


REDIS_TIMEOUT_MS = 200


@pytest.mark.parametrize("fault", ["black_hole", "reset"])
def test_redis_fault_rate_limits_fail_open_within_the_timeout(
    clean_db: str, tmp_path: Path, fault: str
) -> None:
    with proxied(TEST_REDIS_URL) as (proxy, url):
        env = {
            **BREAKER_ENV,
            "RATE_LIMIT_ENABLED": "true",
            "RATE_LIMIT_API": "1000/minute",
            "RATE_LIMIT_STORAGE_URL": url,
            "RATE_LIMIT_KEY_PREFIX": f"resilience-{uuid.uuid4().hex}",
            "RATE_LIMIT_STORAGE_TIMEOUT_MS": str(REDIS_TIMEOUT_MS),
            "SHUTDOWN_GRACE_SECONDS": "5",
        }
        with api_server(tmp_path, "api", **env) as server:
            client = signed_in(wait_ready(server))
            assert "x-ratelimit-limit" in client.get("/api/auth/me").headers

            getattr(proxy, fault)()
            during = [timed(client, "GET", "/api/auth/me") for _ in range(12)]
            for took, response in during:
                assert response.status_code == 200, response.text  # served, unlimited
                assert "x-ratelimit-limit" not in response.headers
                assert took < REDIS_TIMEOUT_MS / 1000 + SLACK, during
            # One warning for the whole outage, whatever the number of requests.
            assert circuit_lines(server, "rate_limit_storage") == ["circuit.opened"]
            warnings = [line for line in server.lines() if line.get("level") == "warning"]
            assert [line["event"] for line in warnings] == ["circuit.opened"], warnings

            proxy.heal()
            wait_for(
                lambda: "x-ratelimit-limit" in client.get("/api/auth/me").headers,
                "rate limiting after heal",
            )
            assert circuit_lines(server, "rate_limit_storage")[-1] == "circuit.closed"

            # SIGTERM while Redis hangs again: the process still exits cleanly, in time.
            getattr(proxy, fault)()
            client.get("/api/auth/me")
            client.close()
            started = time.monotonic()
            assert server.terminate(timeout=5 + 10) == 0
            stopped = time.monotonic() - started
            assert stopped < 5 + SLACK
            slowest = max(took for took, _ in during)
            print(
                f"\nredis {fault}: slowest request {slowest * 1000:.0f} ms, exit in {stopped:.2f} s"
            )


def test_redis_black_holed_fail_closed_answers_503_within_the_timeout(
    clean_db: str, tmp_path: Path
) -> None:
    with proxied(TEST_REDIS_URL) as (proxy, url):
        env = {
            **BREAKER_ENV,
            "RATE_LIMIT_ENABLED": "true",
            "RATE_LIMIT_STORAGE_URL": url,
            "RATE_LIMIT_FAIL_OPEN": "false",
            "RATE_LIMIT_KEY_PREFIX": f"resilience-{uuid.uuid4().hex}",
            "RATE_LIMIT_STORAGE_TIMEOUT_MS": str(REDIS_TIMEOUT_MS),
        }
        with api_server(tmp_path, "api", **env) as server:
            client = signed_in(wait_ready(server))
            proxy.black_hole()
            during = [timed(client, "GET", "/api/auth/me") for _ in range(6)]
            for took, response in during:
                assert response.status_code == 503
                assert envelope_code(response) == "service_unavailable"
                assert took < REDIS_TIMEOUT_MS / 1000 + SLACK, during
            proxy.heal()
            wait_for(lambda: client.get("/api/auth/me").status_code == 200, "requests after heal")
            client.close()


def test_broker_black_holed_submit_answers_503_and_writes_nothing(
    clean_db: str, tmp_path: Path, broker: str
) -> None:
    publish_timeout = 1.0
    with proxied(broker) as (proxy, url):
        env = {
            **BREAKER_ENV,
            "PIPELINE_EXECUTOR": "celery",
            "CELERY_BROKER_URL": url,
            "CELERY_PUBLISH_TIMEOUT_SECONDS": str(publish_timeout),
        }
        with api_server(tmp_path, "api", **env) as server:
            client = signed_in(wait_ready(server))
            upload = client.post(
                "/api/files/upload", files={"file": ("known.csv", KNOWN_TAPE, "text/csv")}
            )
            assert upload.status_code == 201, upload.text
            body = {"input_path": upload.json()["path"]}

            proxy.black_hole()
            tried = [timed(client, "POST", "/api/pipeline/run", json=body) for _ in range(FAILURES)]
            refused = [timed(client, "POST", "/api/pipeline/run", json=body) for _ in range(5)]
            for _took, response in tried + refused:
                assert response.status_code == 503, response.text
                assert envelope_code(response) == "service_unavailable"
                assert int(response.headers["retry-after"]) >= 1
            assert max(took for took, _ in tried) < publish_timeout + SLACK, tried
            refused_ms = statistics.median(took for took, _ in refused) * 1000
            assert refused_ms < 50, refused_ms
            # Nothing half-written: no run is left behind for any refused submit.
            assert client.get("/api/pipeline/runs").json()["total"] == 0

            proxy.heal()
            healed_at = time.monotonic()
            accepted = wait_for(
                lambda: client.post("/api/pipeline/run", json=body).status_code == 202,
                "a submit after heal",
            )
            recovered = time.monotonic() - healed_at
            assert accepted
            runs = client.get("/api/pipeline/runs").json()
            assert runs["total"] == 1 and runs["items"][0]["status"] == "queued"
            lines = circuit_lines(server, "broker")
            assert lines[0] == "circuit.opened" and lines[-1] == "circuit.closed", lines
            client.close()
            print(
                f"\nbroker black-holed: submits {[round(t, 2) for t, _ in tried]} s, "
                f"then {refused_ms:.1f} ms (median), accepted again {recovered:.2f} s after heal"
            )


def test_collector_black_holed_costs_requests_nothing(clean_db: str, tmp_path: Path) -> None:
    """Healthy and black-holed collector in alternating blocks of the same test, so the
    machine's noise falls on both; then SIGTERM still ends the process in time."""
    with OtlpReceiver() as receiver, proxied(receiver.endpoint) as (proxy, url):
        env = {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": url,
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "2",
            "OTEL_SHUTDOWN_TIMEOUT_SECONDS": "1",
        }
        with api_server(tmp_path, "api", **env) as server:
            client = signed_in(wait_ready(server))
            timings: dict[str, list[float]] = {"healthy": [], "black_hole": []}
            for _round in range(4):
                for mode in ("healthy", "black_hole"):
                    if mode == "healthy":
                        proxy.heal()
                    else:
                        proxy.black_hole()
                    for _ in range(40):
                        took, response = timed(client, "GET", "/api/auth/me")
                        assert response.status_code == 200
                        timings[mode].append(took)
            assert receiver.spans(), "the healthy blocks reached the receiver"
            healthy = statistics.median(timings["healthy"])
            holed = statistics.median(timings["black_hole"])
            assert holed <= healthy * 1.2, (healthy, holed)

            proxy.black_hole()
            client.get("/api/auth/me")
            client.close()
            started = time.monotonic()
            assert server.terminate(timeout=30) == 0
            stopped = time.monotonic() - started
            assert stopped < 1 + 3 + SLACK, stopped
            print(
                f"\ncollector black-holed: median {holed * 1000:.2f} ms vs healthy "
                f"{healthy * 1000:.2f} ms ({holed / healthy:.2f}x); exit in {stopped:.2f} s"
            )


def test_failed_logins_block_the_client_across_two_workers(clean_db: str, tmp_path: Path) -> None:
    """Failed logins from one address, spread over two server processes and several
    usernames, add up in Redis; the address is then refused everywhere while another
    address signs in and works as before."""
    failures = 4
    env = {
        "RATE_LIMIT_ENABLED": "true",
        "RATE_LIMIT_LOGIN": "1000/minute",
        "RATE_LIMIT_STORAGE_URL": TEST_REDIS_URL,
        "RATE_LIMIT_KEY_PREFIX": f"resilience-{uuid.uuid4().hex}",
        "ABUSE_LOGIN_FAILURES": str(failures),
        "ABUSE_WINDOW_SECONDS": "60",
        "ABUSE_BLOCK_SECONDS": "120",
    }
    attacker = {"X-Forwarded-For": "198.51.100.66"}
    bystander = {"X-Forwarded-For": "203.0.113.77"}
    with api_server(tmp_path, "a", **env) as a, api_server(tmp_path, "b", **env) as b:
        urls = [wait_ready(a), wait_ready(b)]
        with httpx.Client(timeout=30) as http:

            def login(url: str, headers: dict[str, str], user: str, password: str) -> Any:
                form = {"username": user, "password": password}
                return http.post(f"{url}/api/auth/login", data=form, headers=headers)

            tries = [
                login(urls[n % 2], attacker, f"user{n}", "wrong-password").status_code
                for n in range(failures)
            ]
            # Blocked now, on both processes, even with the right password.
            refused = [login(url, attacker, "admin", ADMIN_PASSWORD) for url in urls]
            served = [login(url, bystander, "admin", ADMIN_PASSWORD) for url in urls]
            token = served[0].json()["access_token"]
            me = http.get(
                f"{urls[1]}/api/auth/me",
                headers={**bystander, "Authorization": f"Bearer {token}"},
            )
            blocked_me = http.get(
                f"{urls[0]}/api/auth/me", headers={**attacker, "Authorization": f"Bearer {token}"}
            )
    assert tries == [401] * failures
    for response in [*refused, blocked_me]:
        assert response.status_code == 429, response.text
        assert envelope_code(response) == "client_blocked"
        assert 100 <= int(response.headers["retry-after"]) <= 120
    assert [r.status_code for r in served] == [200, 200] and me.status_code == 200
    blocked_lines = [
        line for server in (a, b) for line in server.lines()
        if line.get("event") == "abuse.client.blocked"
    ]  # fmt: skip
    assert len(blocked_lines) == 1, blocked_lines
    assert blocked_lines[0]["level"] == "warning"
    assert blocked_lines[0]["client_ip"] == "198.51.100.66"
