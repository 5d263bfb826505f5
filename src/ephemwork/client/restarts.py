"""Keeping a healthy dev server running: report each exit, restart it with backoff.

While the dev server is down its `ServiceGate` is shut, so the bastion's requests for the
route get a 502 from this laptop that says the dev server is not running, and the reverse
forward stays open for when it is healthy again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from ephemwork.client.backoff import Backoff
from ephemwork.client.forwarding import ServiceGate
from ephemwork.client.supervisor import DevServer
from ephemwork.errors import DevServerError

log = structlog.get_logger()

RESTART_BASE = 0.5
RESTART_CAP = 30.0

# A dev server healthy for this many seconds before it exits starts over from the shortest
# restart delay.
STABLE_SECONDS = 30.0


def describe_exit(code: int) -> str:
    """Say how a process ended, from its asyncio return code."""
    if code < 0:
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


async def keep_running(
    dev: DevServer,
    gate: ServiceGate,
    notify: Callable[[str], None],
    record_error: Callable[[str], None] | None = None,
) -> None:
    """Watch a healthy dev server and restart it after each failure; return never.

    *record_error* receives a one-line description of each exit, for ``status``. Raises
    `DevServerError` when the dev server exits and ``restart`` does not allow another
    start: ``"never"``, or exit code 0 with ``"on-failure"``.
    """
    name = dev.name
    policy = dev.service.restart
    backoff = Backoff(RESTART_BASE, RESTART_CAP)

    while True:
        healthy_since = time.monotonic()
        code = await dev.wait_exited()
        how = describe_exit(code)
        gate.shut(f"it {how}")
        log.warning("dev_server.exited", service=name, exit_code=code, restart=policy)
        notify(f"{name}: the dev server {how}.{dev.recent_output()}")
        if record_error is not None:
            record_error(f"the dev server {how}")
        await dev.reap()

        if policy == "never" or code == 0:
            raise DevServerError(
                f"The dev server of {name!r} {how} and service.{name}.restart is {policy!r}, "
                "so its route is closed. Fix the error above and run `ephemwork up` again."
            )
        if time.monotonic() - healthy_since >= STABLE_SECONDS:
            backoff.reset()

        await _restart_until_healthy(dev, backoff, notify)
        gate.open()
        log.info("dev_server.restarted", service=name, attempts=backoff.attempts)
        notify(f"{name}: the dev server is healthy again; its route serves requests again.")


async def _restart_until_healthy(
    dev: DevServer, backoff: Backoff, notify: Callable[[str], None]
) -> None:
    while True:
        delay = backoff.next_delay()
        notify(f"{dev.name}: restarting the dev server in {delay:.1f}s.")
        await asyncio.sleep(delay)

        try:
            await dev.start()
            await dev.wait_healthy()
        except DevServerError as exc:
            log.warning("dev_server.restart_failed", service=dev.name, error=str(exc))
            notify(str(exc))
            await dev.reap()
            continue
        return
