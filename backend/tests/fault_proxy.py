"""A TCP proxy that misbehaves on command, for tests of dependency failures.

Put it between the service and PostgreSQL, Redis, the broker or the OTLP
receiver; point the service at `proxy.address` and switch the proxy's mode
while the test runs:

- `pass_through()`: bytes flow both ways (the healthy dependency, and `heal()`);
- `refuse()`: the port stops listening (new connections are refused) and open
  connections are reset;
- `black_hole()`: new connections are accepted and nothing is ever answered;
  bytes on open connections are swallowed, both ways (a dependency that hangs);
- `reset()`: connections are accepted and reset at once, open ones reset too
  (a dependency behind a load balancer with no healthy target);
- `delay(seconds)`: every chunk waits `seconds` before it is passed on.

The proxy runs its own event loop on a thread, so a test may drive it from
synchronous or asynchronous code while the service runs in the test process
or in subprocesses. Connections it holds in the black hole are closed when the
mode changes or the proxy stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from typing import Any, Literal

Mode = Literal["pass", "refuse", "black_hole", "reset", "delay"]
CHUNK = 65536


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST rather than a FIN (SO_LINGER 0), like a peer that died."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """Listens on 127.0.0.1:<port> and forwards to `target_host:target_port`."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.mode: Mode = "pass"
        self.latency = 0.0
        self.port = 0
        self.accepted = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._changed = asyncio.Event()

    # -- control (any thread) -------------------------------------------------

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        self._run(self._listen())
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._run(self._close_all(listen=False))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def pass_through(self) -> None:
        self._set("pass")

    heal = pass_through

    def refuse(self) -> None:
        self._set("refuse")

    def black_hole(self) -> None:
        self._set("black_hole")

    def reset(self) -> None:
        self._set("reset")

    def delay(self, seconds: float) -> None:
        self.latency = seconds
        self._set("delay")

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- inside the proxy's loop ----------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def _set(self, mode: Mode) -> None:
        self._run(self._switch(mode))

    async def _switch(self, mode: Mode) -> None:
        previous, self.mode = self.mode, mode
        # Wake every pump so held bytes and black-holed connections see the change.
        self._changed.set()
        self._changed = asyncio.Event()
        if mode in ("refuse", "reset") or previous == "black_hole":
            # Connections that saw a failure must not come back to life on heal.
            for writer in list(self._conns):
                _abort(writer)
            self._conns.clear()
        if mode == "refuse" and self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        elif mode != "refuse" and self._server is None:
            await self._listen()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close_all(self, listen: bool) -> None:
        for writer in list(self._conns):
            _abort(writer)
        self._conns.clear()
        if self._server is not None and not listen:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.mode == "reset":
            _abort(writer)
            return
        self._conns.add(writer)
        if self.mode == "black_hole":
            await self._swallow(reader)
            self._conns.discard(writer)
            _abort(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            self._conns.discard(writer)
            _abort(writer)
            return
        self._conns.add(up_writer)
        await asyncio.gather(
            self._pump(reader, up_writer, writer),
            self._pump(up_reader, writer, up_writer),
            return_exceptions=True,
        )
        for end in (writer, up_writer):
            self._conns.discard(end)
            end.close()

    async def _swallow(self, reader: asyncio.StreamReader) -> None:
        """Read and drop until the mode changes or the peer goes away."""
        changed = self._changed
        while not changed.is_set():
            read = asyncio.ensure_future(reader.read(CHUNK))
            waiter = asyncio.ensure_future(changed.wait())
            done, _ = await asyncio.wait({read, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if read not in done:
                read.cancel()
                return
            if not read.result():
                return

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        source: asyncio.StreamWriter,
    ) -> None:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            if self.mode == "black_hole":
                # Swallow this chunk and everything after it until the mode changes,
                # which aborts this connection (see `_switch`).
                await self._swallow(reader)
                return
            if self.mode == "delay" and self.latency > 0:
                await asyncio.sleep(self.latency)
            if writer.is_closing():
                _abort(source)
                return
            writer.write(data)
            await writer.drain()
