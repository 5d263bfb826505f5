"""Tests for the WebSocket relay's handling of a side that fails while a frame is sent.

A real peer that resets its connection between a frame's arrival on the other side and
the relay's send cannot be timed from a test, so these tests drive `relay_websocket` with
stand-in WebSockets whose send raises as aiohttp does for a reset transport.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import aiohttp
from aiohttp import web

from ephemwork.bastion.websocket import (
    CLOSE_BAD_GATEWAY,
    CLOSE_INTERNAL_ERROR,
    relay_websocket,
)


class StandInWebSocket:
    """The part of aiohttp's WebSocket interface the relay uses, fed from a queue."""

    incoming: asyncio.Queue[aiohttp.WSMessage]
    send_error: Exception | None
    sent: list[str]
    close_calls: list[int]
    closed: bool
    close_code: int | None

    def __init__(self, *, send_error: Exception | None = None) -> None:
        self.incoming = asyncio.Queue()
        self.send_error = send_error
        self.sent = []
        self.close_calls = []
        self.closed = False
        self.close_code = None

    async def receive(self) -> aiohttp.WSMessage:
        return await self.incoming.get()

    async def send_str(self, data: str) -> None:
        if self.send_error is not None:
            raise self.send_error
        self.sent.append(data)

    async def close(self, *, code: int, message: bytes) -> bool:
        self.close_calls.append(code)
        self.closed = True
        return True


def text_message(data: str) -> aiohttp.WSMessage:
    return aiohttp.WSMessage(aiohttp.WSMsgType.TEXT, data, None)


async def relay(caller: StandInWebSocket, dev_server: StandInWebSocket) -> Any:
    """Run the relay between the stand-ins with an idle timeout far above the test's run."""
    return await asyncio.wait_for(
        relay_websocket(
            cast(web.WebSocketResponse, caller),
            cast(aiohttp.ClientWebSocketResponse, dev_server),
            idle_timeout=60.0,
            log_fields={"route": "alice:api"},
        ),
        5,
    )


class TestSendFailure:
    async def test_caller_gone(self) -> None:
        """A reset caller ends the relay as a send failure with 1011, not as an idle timeout."""
        caller = StandInWebSocket(send_error=ConnectionResetError("Connection lost"))
        dev_server = StandInWebSocket()
        dev_server.incoming.put_nowait(text_message("update"))

        outcome = await relay(caller, dev_server)

        assert outcome.closed_by == "caller_send_failed"
        assert outcome.close_code == CLOSE_INTERNAL_ERROR
        assert dev_server.close_calls == [CLOSE_INTERNAL_ERROR]

    async def test_dev_server_gone(self) -> None:
        """A reset dev server closes the caller with 1014 and the dev server side with 1011."""
        caller = StandInWebSocket()
        dev_server = StandInWebSocket(
            send_error=aiohttp.ClientConnectionResetError("Cannot write to closing transport")
        )
        caller.incoming.put_nowait(text_message("hello"))

        outcome = await relay(caller, dev_server)

        assert outcome.closed_by == "dev_server_send_failed"
        assert caller.close_calls == [CLOSE_BAD_GATEWAY]
        assert dev_server.close_calls == [CLOSE_INTERNAL_ERROR]

    async def test_frames_still_relayed(self) -> None:
        """Frames are passed on while both sides accept them."""
        caller = StandInWebSocket()
        dev_server = StandInWebSocket()
        caller.incoming.put_nowait(text_message("one"))
        caller.incoming.put_nowait(aiohttp.WSMessage(aiohttp.WSMsgType.CLOSE, 1000, ""))

        outcome = await relay(caller, dev_server)

        assert dev_server.sent == ["one"]
        assert outcome.closed_by == "caller"
