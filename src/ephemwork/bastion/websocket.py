"""WebSocket relay: one connection to the dev server, one to the caller, frames both ways.

The caller's connection is upgraded only after the dev server answered 101, so a dev server
that refuses the upgrade leaves the caller with an ordinary HTTP answer. Each side's frames
are parsed and validated by aiohttp; text, binary, ping and pong frames are passed on as
they are, and a close frame is passed on with its code and reason.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import attrs
import structlog
from aiohttp import web

# Close codes that must never appear in a close frame (RFC 6455 section 7.4.1); they only
# describe what happened to a connection.
_UNSENDABLE_CLOSE_CODES = frozenset({1005, 1006, 1015})

# The registered code for "a gateway received an invalid response from the upstream".
CLOSE_BAD_GATEWAY = 1014
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
# "The server met an unexpected condition" (RFC 6455 section 7.4.1).
CLOSE_INTERNAL_ERROR = 1011

# Largest message relayed, in bytes; aiohttp's default. Vite's hot-module-reload messages
# are a few KiB.
MAX_MESSAGE_SIZE = 4 * 1024 * 1024

logger = structlog.get_logger()

AnyWebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


@attrs.define
class RelayOutcome:
    """The end of a relayed WebSocket connection: who closed it, the code and message counts."""

    # Which side ended the relay: "caller", "dev_server" or "idle_timeout" when a close
    # frame or a lost connection came from that side, or "caller_send_failed" or
    # "dev_server_send_failed" when forwarding a frame to that side raised.
    closed_by: str = "idle_timeout"
    close_code: int | None = None
    messages_up: int = 0
    messages_down: int = 0


def sendable_close_code(code: int | None) -> int:
    """Return a close code that may be sent in a frame, for a *code* received or missing."""
    if code is None or code == 1005:
        return CLOSE_NORMAL
    if code in _UNSENDABLE_CLOSE_CODES or not 1000 <= code <= 4999:
        return CLOSE_BAD_GATEWAY
    return code


async def relay_websocket(
    caller: web.WebSocketResponse,
    dev_server: aiohttp.ClientWebSocketResponse,
    *,
    idle_timeout: float,
    log_fields: dict[str, object],
) -> RelayOutcome:
    """Relay frames between the two connections until one closes or both are idle.

    *idle_timeout* counts seconds with no frame in either direction; when it passes both
    sides are closed with 1001 (going away).
    """
    outcome = RelayOutcome()
    last_activity = [time.monotonic()]

    async def pump(source: AnyWebSocket, target: AnyWebSocket, name: str) -> None:
        while True:
            message = await source.receive()
            last_activity[0] = time.monotonic()
            if message.type == aiohttp.WSMsgType.CLOSE:
                code: int | None = message.data
                break
            if message.type in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                code = source.close_code
                break
            if message.type == aiohttp.WSMsgType.ERROR:
                logger.info("proxy.websocket_error", side=name, error=repr(message.data))
                code = 1006
                break
            if name == "caller":
                outcome.messages_up += 1
            else:
                outcome.messages_down += 1
            try:
                await _forward_frame(message, target)
            except (aiohttp.ClientError, ConnectionError) as exc:
                # The target is gone or closing; aiohttp raises ConnectionResetError or
                # ClientConnectionResetError for a closed transport.
                failed_side = "dev_server" if name == "caller" else "caller"
                logger.info(
                    "proxy.websocket_send_failed",
                    side=failed_side,
                    error=repr(exc),
                    **log_fields,
                )
                if outcome.close_code is None:
                    outcome.closed_by = f"{failed_side}_send_failed"
                    outcome.close_code = CLOSE_INTERNAL_ERROR
                return

        if outcome.close_code is None:
            outcome.closed_by = name
            outcome.close_code = code

    up = asyncio.create_task(pump(caller, dev_server, "caller"), name="websocket-relay-up")
    down = asyncio.create_task(pump(dev_server, caller, "dev_server"), name="websocket-relay-down")
    tasks = {up, down}
    try:
        while True:
            remaining = last_activity[0] + idle_timeout - time.monotonic()
            if remaining <= 0:
                break
            done, _ = await asyncio.wait(tasks, timeout=remaining, return_when="FIRST_COMPLETED")
            if done:
                break
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    code = sendable_close_code(outcome.close_code)
    caller_code = code
    if outcome.closed_by == "dev_server_send_failed":
        # Towards the caller, the dev server side is the upstream that failed.
        caller_code = CLOSE_BAD_GATEWAY
    if outcome.closed_by == "idle_timeout":
        code = caller_code = CLOSE_GOING_AWAY
        logger.info("proxy.websocket_idle_timeout", idle_timeout=idle_timeout, **log_fields)
    await _close(
        caller, caller_code, b"" if outcome.closed_by != "idle_timeout" else b"idle timeout"
    )
    await _close(dev_server, code, b"" if outcome.closed_by != "idle_timeout" else b"idle timeout")
    return outcome


async def _forward_frame(message: aiohttp.WSMessage, target: AnyWebSocket) -> None:
    if message.type == aiohttp.WSMsgType.TEXT:
        await target.send_str(message.data)
    elif message.type == aiohttp.WSMsgType.BINARY:
        await target.send_bytes(message.data)
    elif message.type == aiohttp.WSMsgType.PING:
        await target.ping(message.data)
    elif message.type == aiohttp.WSMsgType.PONG:
        await target.pong(message.data)


async def _close(websocket: AnyWebSocket, code: int, reason: bytes) -> None:
    if websocket.closed:
        return
    try:
        await websocket.close(code=code, message=reason)
    except (aiohttp.ClientError, ConnectionError) as exc:
        # The peer is already gone; nothing is left to tell it.
        logger.debug("proxy.websocket_close_failed", error=repr(exc))
