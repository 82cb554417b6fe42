"""Helpers shared by the observability tests: log capture, an OTLP/HTTP receiver, ports."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

import httpx
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every stdout line that is a JSON object (uvicorn's supervisor prints plain text)."""
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def events(lines: list[dict[str, Any]], event: str, **match: Any) -> list[dict[str, Any]]:
    return [
        line
        for line in lines
        if line.get("event") == event and all(line.get(k) == v for k, v in match.items())
    ]


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` until true or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class OtlpReceiver:
    """A real OTLP/HTTP endpoint (/v1/traces and /v1/metrics) on a free local port,
    decoding what it gets."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.metric_requests: list[ExportMetricsServiceRequest] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                payload, status = b"", 404
                if self.path == "/v1/traces":
                    message = ExportTraceServiceRequest()
                    message.ParseFromString(body)
                    with receiver._lock:
                        receiver.requests.append(message)
                    payload, status = ExportTraceServiceResponse().SerializeToString(), 200
                elif self.path == "/v1/metrics":
                    metrics_message = ExportMetricsServiceRequest()
                    metrics_message.ParseFromString(body)
                    with receiver._lock:
                        receiver.metric_requests.append(metrics_message)
                    payload, status = ExportMetricsServiceResponse().SerializeToString(), 200
                self.send_response(status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port: int = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    def spans(self) -> Iterator[tuple[dict[str, Any], Any]]:
        """(resource attributes, span) for every span received so far."""
        with self._lock:
            requests = list(self.requests)
        for request in requests:
            for resource_spans in request.resource_spans:
                resource = {
                    attr.key: attr.value.string_value for attr in resource_spans.resource.attributes
                }
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        yield resource, span

    def metrics(self) -> Iterator[tuple[dict[str, Any], Any]]:
        """(resource attributes, metric) for every metric received so far."""
        with self._lock:
            requests = list(self.metric_requests)
        for request in requests:
            for resource_metrics in request.resource_metrics:
                resource = {
                    attr.key: attr.value.string_value
                    for attr in resource_metrics.resource.attributes
                }
                for scope_metrics in resource_metrics.scope_metrics:
                    for metric in scope_metrics.metrics:
                        yield resource, metric


ROOT = Path(__file__).resolve().parents[2]


class Uvicorn:
    """`uvicorn backend.api.main:app` in a subprocess on a free port; always stopped.

    Its output goes to a temporary file, not a pipe: a DEBUG run prints more than a
    pipe holds, and a server blocked on a full pipe stops answering.
    """

    def __init__(
        self, env: dict[str, str], workers: int = 1, app: str = "backend.api.main:app"
    ) -> None:
        self.app = app
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **env}
        self.workers = workers
        self.output = ""
        self.process: subprocess.Popen[str] | None = None
        self._log: IO[str] | None = None

    def __enter__(self) -> Uvicorn:
        command = [sys.executable, "-m", "uvicorn", self.app]
        command += ["--host", "127.0.0.1", "--port", str(self.port)]
        if self.workers > 1:
            command += ["--workers", str(self.workers)]
        self._log = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, text=True
        )
        try:
            wait_until(self._answers, 30, f"uvicorn on port {self.port}")
        except BaseException:
            self.__exit__()
            raise
        return self

    def _printed(self) -> str:
        assert self._log is not None
        self._log.seek(0)
        return self._log.read()

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"uvicorn exited: {self._printed()[-3000:]}")
        try:
            return httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def __exit__(self, *exc: object) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and keep what it printed."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
        self.output = self._printed()
        assert self._log is not None
        self._log.close()
