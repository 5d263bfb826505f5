"""The laptop end of a route's reverse forward, gated on the dev server being up.

Each connection that the bastion forwards through the SSH connection is handed to the dev
server only while its supervisor reports it healthy. While the dev server is down (it
crashed, or is restarting), this process answers the request itself with a 502 that says so,
and the reverse forward stays open, so the route comes back without registering again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import cast

import asyncssh
import structlog

log = structlog.get_logger()

DEV_SERVER_DOWN_MESSAGE = "the dev server on the laptop is not running"

# A request head larger than this is not read further before the 502 is sent.
_MAX_HEAD_BYTES = 64 * 1024


class ServiceGate:
    """Whether a service's dev server may receive connections, and where it listens."""

    service: str
    local_port: int
    serving: bool
    # The reason the dev server is down, shown in the 502 body, such as "it exited with code 3".
    reason: str

    def __init__(self, service: str, local_port: int, *, serving: bool = True) -> None:
        self.service = service
        self.local_port = local_port
        self.serving = serving
        self.reason = ""

    def open(self) -> None:
        """Send new connections to the dev server again."""
        self.serving = True
        self.reason = ""

    def shut(self, reason: str) -> None:
        """Answer new connections with a 502 naming *reason* until `open` is called."""
        self.serving = False
        self.reason = reason

    def session_factory(
        self, conn: asyncssh.SSHClientConnection
    ) -> Callable[[str, int], Awaitable[asyncssh.SSHTCPSession[bytes]]]:
        """Return the asyncssh session factory for a remote listener on *conn*."""

        async def create(_orig_host: str, _orig_port: int) -> asyncssh.SSHTCPSession[bytes]:
            if self.serving:
                try:
                    forwarder = await conn.forward_connection("127.0.0.1", self.local_port)
                except asyncssh.ChannelOpenError as exc:
                    log.warning(
                        "forward.dev_server_refused",
                        service=self.service,
                        local_port=self.local_port,
                        error=exc.reason,
                    )
                    return UnavailableSession(
                        f"{DEV_SERVER_DOWN_MESSAGE} (127.0.0.1:{self.local_port}: {exc.reason})"
                    )
                # asyncssh's own forward_remote_port returns its SSHForwarder the same way.
                return cast(asyncssh.SSHTCPSession[bytes], forwarder)

            log.debug("forward.dev_server_down", service=self.service, reason=self.reason)
            detail = f" ({self.reason})" if self.reason else ""
            return UnavailableSession(f"{DEV_SERVER_DOWN_MESSAGE}{detail}")

        return create


class UnavailableSession(asyncssh.SSHTCPSession[bytes]):
    """Reads one request head from the channel, answers 502 with *message* and closes."""

    _message: str
    _received: bytearray
    _chan: asyncssh.SSHTCPChannel[bytes] | None
    _answered: bool

    def __init__(self, message: str) -> None:
        self._message = message
        self._received = bytearray()
        self._chan = None
        self._answered = False

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        self._chan = chan

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self._received += data
        # The response waits for the end of the request head, so the bastion's proxy has
        # finished sending and reads the whole 502 instead of a reset.
        if b"\r\n\r\n" in self._received or len(self._received) > _MAX_HEAD_BYTES:
            self._answer()

    def eof_received(self) -> bool:
        self._answer()
        return False

    def _answer(self) -> None:
        if self._answered or self._chan is None:
            return
        self._answered = True

        body = f"{self._message}\n".encode()
        head = (
            "HTTP/1.1 502 Bad Gateway\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n"
            "\r\n"
        ).encode()
        self._chan.write(head + body)
        self._chan.write_eof()
        self._chan.close()
