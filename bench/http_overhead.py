"""What the request path costs: bare FastAPI against the full stack, over HTTP and in process.

Four servers, one uvicorn worker each, the same trivial route (`GET /api/ping`):
bare `FastAPI()`; the full stack (create_app: every middleware, 100% sampling with
spans exported to a live OTLP receiver, metrics on, rate limiting on with a limit
nothing reaches, the JSON access line going to a file); the full stack at
parent-based 10% sampling; and a control, bare FastAPI burning the full stack's
extra CPU per request in its handler (same work, no middleware: a p99 that matches
the full stack's comes from the work per request, not from pauses).

First the in-process CPU time per request (ASGI calls, no HTTP: steadier on a noisy
machine). Then wrk (Debian's package, installed when missing) drives each server in
interleaved rounds after a warm-up; medians and ratios to bare are printed, and the
full stack's RSS after warm-up and after --rss-requests requests.

    python bench/http_overhead.py [--rounds 5] [--seconds 5] [--rss-requests 200000]
    python bench/http_overhead.py --layers    # where the CPU goes, layer by layer
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
from _support import ROOT, migrated_database_url

from backend.tests.hardening_support import free_port, http_scope
from backend.tests.obs_helpers import OtlpReceiver

VENV_BIN = Path(sys.executable).parent
CONNECTIONS = 32


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found is None:
        subprocess.run(["bash", str(ROOT / ".ci/apt-tools.sh"), "wrk=wrk"], check=True)
        found = shutil.which("wrk")
    if found is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    return found


def stack_env(database_url: str, storage: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.isupper() or key == "PATH"}
    env.update(
        PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'bench'}",
        ENVIRONMENT="test",
        SECRET_KEY=secrets.token_hex(16),
        DATABASE_URL=database_url,
        STORAGE_LOCAL_ROOT=str(storage),
        ADMIN_PASSWORD=secrets.token_urlsafe(16),
        LOG_LEVEL="INFO",
        RATE_LIMIT_ENABLED="true",
        RATE_LIMIT_API="100000000/minute",
        METRICS_ENABLED="true",
    )
    env.update(extra)
    return env


def traced_env(database_url: str, folder: Path, receiver: OtlpReceiver) -> dict[str, str]:
    """The full stack's environment: spans and metrics over OTLP to `receiver`."""
    return stack_env(
        database_url,
        folder / "storage",
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_METRICS_EXPORTER="otlp",
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
    )


@contextmanager
def server(app: str, env: dict[str, str], log: Path) -> Iterator[tuple[str, psutil.Process]]:
    """uvicorn serving `_ping_apps:<app>` on a free port, its output in `log`."""
    port = free_port()
    argv = [str(VENV_BIN / "uvicorn"), f"_ping_apps:{app}", "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--no-access-log", "--log-level", "warning"]
    with log.open("wb") as out:
        process = subprocess.Popen(argv, env=env, cwd=ROOT / "bench", stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/api/ping", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{app} did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield url, psutil.Process(process.pid)
    finally:
        process.terminate()
        process.wait(30)


def wrk(binary: str, url: str, seconds: int) -> dict[str, float]:
    """One wrk run: requests/s, p50 and p99 ms, and the request count."""
    argv = [binary, "-t2", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency"]
    argv.append(f"{url}/api/ping")
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def percentile(label: str) -> float:
        value, unit = re.search(rf"{label}%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    if "Non-2xx" in out or "Socket errors" in out:
        raise SystemExit(f"wrk saw errors:\n{out}")
    return {"rps": rps, "p50": percentile("50"), "p99": percentile("99"), "requests": total}


async def cpu_per_request(app: Any, count: int) -> float:
    """Process CPU microseconds per `GET /api/ping` called straight on the ASGI app
    (the median of three batches of `count`)."""
    scope = http_scope(
        "/api/ping",
        host="127.0.0.1",
        headers=[(b"user-agent", b"bench")],
        client=("127.0.0.1", 50000),
    )

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            assert message["status"] == 200, message

    for _ in range(200):  # warm-up
        await app(dict(scope), receive, send)
    batches = []
    for _ in range(3):  # the median of three batches: steadier on a shared machine
        began = time.process_time()
        for _ in range(count):
            await app(dict(scope), receive, send)
        batches.append((time.process_time() - began) / count * 1e6)
    return statistics.median(batches)


async def in_process(count: int, without: str | None = None) -> dict[str, Any]:
    """Run in a child process whose environment is the full stack's: its CPU time holds
    the app and its exporter threads, not the receiver's decoding. `without` names a
    declared layer to take out of the full stack first."""
    import _ping_apps

    figures: dict[str, Any] = {"bare": await cpu_per_request(_ping_apps.bare, count)}
    full = _ping_apps.full
    figures["layers"] = [getattr(m.cls, "__name__", "?") for m in full.user_middleware]
    if without:
        kept = [m for m in full.user_middleware if getattr(m.cls, "__name__", "") != without]
        if len(kept) == len(full.user_middleware):
            raise SystemExit(f"no layer named {without}")
        full.user_middleware = kept
    # The access lines are written (the cost is measured), into memory.
    with contextlib.redirect_stdout(io.StringIO()):
        async with full.router.lifespan_context(full):
            figures["full"] = await cpu_per_request(full, count)
    return figures


def child_cpu(env: dict[str, str], count: int, without: str | None = None) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--cpu-only", "--cpu-requests", str(count)]
    if without:
        argv += ["--without", without]
    child = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    figures: dict[str, Any] = json.loads(child.stdout.strip().splitlines()[-1])
    return figures


def layer_costs(count: int) -> None:
    """Where the full stack's CPU goes: each declared layer taken out in turn, and the
    span and metric export switched off (every figure from its own child process)."""
    with tempfile.TemporaryDirectory(prefix="loan-layers-") as tmp, OtlpReceiver() as receiver:
        env = traced_env(migrated_database_url(), Path(tmp), receiver)
        quiet = {
            **env,
            "OTEL_TRACES_EXPORTER": "none",
            "OTEL_METRICS_EXPORTER": "none",
            "METRICS_ENABLED": "false",
        }
        full = child_cpu(env, count)
        base = full["full"]
        print(f"in process, CPU per request ({count:,} requests each)")
        print(f"{'bare FastAPI':<44}{full['bare']:>8.0f} us")
        print(f"{'full stack':<44}{full['full']:>8.0f} us")
        no_export = child_cpu(quiet, count)["full"]
        print(
            f"{'full, no span or metric export':<44}{no_export:>8.0f} us  ({no_export - base:+.0f})"
        )
        for name in full["layers"]:
            cost = child_cpu(env, count, name)["full"]
            print(f"{'full without ' + name:<44}{cost:>8.0f} us  ({cost - base:+.0f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rss-requests", type=int, default=200_000)
    parser.add_argument("--cpu-requests", type=int, default=2000)
    parser.add_argument(
        "--layers",
        action="store_true",
        help="only the in-process CPU per request, with each declared layer taken out in turn",
    )
    parser.add_argument("--cpu-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--without", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cpu_only:
        print(json.dumps(asyncio.run(in_process(args.cpu_requests, args.without))))
        return
    if args.layers:
        layer_costs(args.cpu_requests)
        return
    binary = ensure_wrk()
    database_url = migrated_database_url()
    stacks = ("bare", "full 100%", "full 10%", "bare+CPU")
    results: dict[str, list[dict[str, float]]] = {name: [] for name in stacks}

    with tempfile.TemporaryDirectory(prefix="loan-http-bench-") as tmp, OtlpReceiver() as receiver:
        folder = Path(tmp)
        traced = traced_env(database_url, folder, receiver)
        sampled = {
            **traced,
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.1",
        }
        # First the CPU per request in process (a child process: its CPU time holds the
        # app and its exporter threads, not this process's receiver).
        cpu = child_cpu(traced, args.cpu_requests)
        # The control: bare FastAPI burning the full stack's extra CPU per request.
        control = {**traced, "BUSY_MICROSECONDS": str(round(cpu["full"] - cpu["bare"]))}
        with ExitStack() as servers:
            urls = {
                "bare": servers.enter_context(server("bare", traced, folder / "bare.log")),
                "full 100%": servers.enter_context(server("full", traced, folder / "full.log")),
                "full 10%": servers.enter_context(server("full", sampled, folder / "full10.log")),
                "bare+CPU": servers.enter_context(server("busy", control, folder / "busy.log")),
            }
            for name in stacks:  # warm-up, not counted
                wrk(binary, urls[name][0], 2)
            rss_warm = urls["full 100%"][1].memory_info().rss / 1e6
            for round_no in range(args.rounds):
                for name in stacks:
                    results[name].append(wrk(binary, urls[name][0], args.seconds))
                print(f"round {round_no + 1}/{args.rounds} done", flush=True)
            sent = sum(r["requests"] for r in results["full 100%"])
            while sent < args.rss_requests:
                sent += wrk(binary, urls["full 100%"][0], args.seconds)["requests"]
            rss_after = urls["full 100%"][1].memory_info().rss / 1e6
        log_lines = sum(1 for _ in (folder / "full.log").open())

    bare_rps = statistics.median(r["rps"] for r in results["bare"])
    bare_p99 = statistics.median(r["p99"] for r in results["bare"])
    print(f"\nwrk -t2 -c{CONNECTIONS}, {args.rounds} interleaved rounds of {args.seconds:g} s")
    print(f"{'stack':<12}{'req/s':>10}{'ratio':>8}{'p50 ms':>10}{'p99 ms':>10}{'p99 ratio':>11}")
    for name in stacks:
        rps = statistics.median(r["rps"] for r in results[name])
        p50 = statistics.median(r["p50"] for r in results[name])
        p99 = statistics.median(r["p99"] for r in results[name])
        print(
            f"{name:<12}{rps:>10.0f}{rps / bare_rps:>8.2f}{p50:>10.1f}{p99:>10.1f}"
            f"{p99 / bare_p99:>11.1f}"
        )
    print("targets: full 100% >= 0.50, full 10% >= 0.65, p99 <= 2.5x bare")
    print(
        f"bare+CPU: bare FastAPI burning {control['BUSY_MICROSECONDS']} us a request, the "
        "full stack's extra CPU: its p99 is what that much work per request costs"
    )
    print(f"full stack access log: {log_lines:,} lines written")
    print(
        f"RSS full 100%: {rss_warm:.1f} MB after warm-up, {rss_after:.1f} MB after "
        f"{sent:,} requests (growth {rss_after - rss_warm:+.1f} MB; target <= 10 MB)"
    )
    print(
        f"in process, CPU per request: bare {cpu['bare']:.0f} us, full {cpu['full']:.0f} us "
        f"({cpu['full'] / cpu['bare']:.1f}x)"
    )


if __name__ == "__main__":
    main()
