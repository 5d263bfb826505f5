"""Turning SIGINT and SIGTERM into an orderly stop of a long-running command."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable
from types import TracebackType
from typing import TypeVar

import structlog

log = structlog.get_logger()

T = TypeVar("T")

# `ephemwork down SERVICE` marks the service "stop_requested" in local state, then sends
# this signal, so an `up` that serves several services stops only that one.
DOWN_SIGNAL = signal.SIGUSR1


class StopRequested(Exception):
    """Raised out of `StopSignal.race` when SIGINT or SIGTERM arrived first."""


class StopSignal:
    """An event set by SIGINT or SIGTERM while the ``with`` block runs.

    Long steps run through `race`, so a Ctrl-C during a build or a health check stops the
    step at once instead of after it. `DOWN_SIGNAL` sets `down_requested` instead; it is
    handled from the start, because its default action would kill the process.
    """

    event: asyncio.Event
    down_requested: asyncio.Event
    signal_name: str | None

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.down_requested = asyncio.Event()
        self.signal_name = None

    def __enter__(self) -> StopSignal:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._on_signal, signum)
        loop.add_signal_handler(DOWN_SIGNAL, self.down_requested.set)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM, DOWN_SIGNAL):
            loop.remove_signal_handler(signum)

    def _on_signal(self, signum: signal.Signals) -> None:
        if not self.event.is_set():
            self.signal_name = signum.name
            log.info("stop.requested", signal=signum.name)
        self.event.set()

    async def race(self, step: Awaitable[T]) -> T:
        """Await *step*, or cancel it and raise `StopRequested` if a stop signal comes first."""
        task = asyncio.ensure_future(step)
        waiter = asyncio.ensure_future(self.event.wait())
        try:
            await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            waiter.cancel()

        if task.done():
            return task.result()

        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise StopRequested
