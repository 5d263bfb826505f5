"""Tests of the relay's tunnel connections against a raw HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from ephemwork.bastion.tunnel_connections import TunnelConnection, TunnelPool, TunnelProblem

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


class Sink:
    """Records what a tunnel connection delivers; optionally pauses it on the first bytes."""

    def __init__(self, pause: TunnelConnection | None = None) -> None:
        self.data = bytearray()
        self.done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pause = pause

    def tunnel_data(self, data: bytes) -> None:
        self.data += data
        if self._pause is not None:
            # What the relay does when the caller's send buffer fills up.
            self._pause.pause_reading()
            self._pause = None

    def tunnel_done(self, status: int) -> None:
        self.done.set_result(status)

    def tunnel_failed(self, problem: TunnelProblem, detail: str) -> None:
        self.done.set_exception(RuntimeError(f"{problem.value}: {detail}"))

    def tunnel_pause_sending(self) -> None:
        pass

    def tunnel_resume_sending(self) -> None:
        pass


@pytest.fixture
async def dev_port() -> AsyncIterator[int]:
    """A dev server that responds to every request head with `RESPONSE` in one write."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(RESPONSE)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


async def test_paused_connection_reused(dev_port: int) -> None:
    """A connection paused while its response completed reads the next response again."""
    pool = TunnelPool(asyncio.get_running_loop(), connect_timeout=2, read_timeout=2, keepalive=4)
    connection = await pool.open(dev_port)

    first = Sink(pause=connection)
    connection.send_request(first, REQUEST, caller_wants_close=False, complete=True)
    assert await first.done == 200

    assert pool.take(dev_port) is connection
    second = Sink()
    connection.send_request(second, REQUEST, caller_wants_close=False, complete=True)
    assert await second.done == 200
    assert bytes(second.data).endswith(b"\r\n\r\nok")
    pool.close()


async def test_unfinished_request_not_reused(dev_port: int) -> None:
    """A response that arrives before the request body's end closes the connection."""
    pool = TunnelPool(asyncio.get_running_loop(), connect_timeout=2, read_timeout=2, keepalive=4)
    connection = await pool.open(dev_port)

    sink = Sink()
    head = b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n\r\n"
    connection.send_request(sink, head, caller_wants_close=False, complete=False)
    assert await sink.done == 200

    assert pool.take(dev_port) is None
    pool.close()
