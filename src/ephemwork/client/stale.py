"""Cleaning up after an ``up`` that is gone without stopping (``kill -9``, a reboot).

Such an ``up`` leaves three things behind. Its dev server's process group keeps running and
keeps the service's port. Its session on the bastion keeps the route until the lease
expires, so a new ``up`` fails with "route taken" meanwhile. Its record stays in local
state. `clean_stale_record` removes the first two, and callers remove the record.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import asyncssh
import structlog

from ephemwork.client.control import ControlClient
from ephemwork.client.endpoint import target_of
from ephemwork.client.leftovers import stop_recorded_group
from ephemwork.client.state import SessionRecord
from ephemwork.client.tunnel import connect
from ephemwork.errors import ControlAPIError, TunnelError

log = structlog.get_logger()

# Seconds between SIGTERM and SIGKILL for a leftover dev server. The service's own
# stop_timeout is not in local state; this is its default.
LEFTOVER_STOP_TIMEOUT = 5.0

# Name prefix of the key files that local mode writes into the ephemwork home folder.
LOCAL_KEY_PREFIX = "local-bastion-"


async def clean_stale_record(record: SessionRecord, notify: Callable[[str], None]) -> None:
    """Stop the leftover dev server of *record* and deregister its session from the bastion.

    Reports each step through *notify*. A bastion that cannot be reached is reported, not
    raised, because its lease expiry removes the route anyway.
    """
    header = record.header_value
    if record.dev_pgid is not None:
        stopped = await stop_recorded_group(
            record.dev_pgid, record.dev_start_ticks, record.dev_marker, LEFTOVER_STOP_TIMEOUT
        )
        if stopped:
            notify(
                f"Stopped the dev server of {header} that `ephemwork up` (pid {record.pid}) "
                f"left running (process group {record.dev_pgid}); port {record.local_port} "
                "is free again."
            )

    endpoint = record.bastion
    if endpoint is None:
        if record.session_id:
            notify(f"The bastion drops the route {header} when its lease expires.")
        return
    if endpoint.in_process:
        _remove_local_key(endpoint.identity_files)
        return
    if not record.session_id:
        return

    try:
        await _deregister(record)
    except ControlAPIError as exc:
        if exc.code == "session_not_found":
            notify(f"The bastion had already dropped {header} (session {record.session_id}).")
            return
        _report_unreachable(record, exc, notify)
        return
    except TunnelError as exc:
        _report_unreachable(record, exc, notify)
        return
    notify(f"Deregistered {header} (session {record.session_id}) from the bastion.")


async def _deregister(record: SessionRecord) -> None:
    assert record.bastion is not None
    target = target_of(record.bastion)
    conn = await connect(target)
    try:
        await ControlClient(conn, target.control_port).deregister(record.session_id)
    finally:
        conn.close()
        try:
            await conn.wait_closed()
        except (asyncssh.Error, OSError) as exc:
            log.info("stale.close_failed", error=str(exc))
    log.info("stale.deregistered", route=record.header_value, session_id=record.session_id)


def _report_unreachable(
    record: SessionRecord, error: Exception, notify: Callable[[str], None]
) -> None:
    log.warning(
        "stale.deregister_failed",
        route=record.header_value,
        session_id=record.session_id,
        error=str(error),
    )
    notify(
        f"Could not deregister {record.header_value} from the bastion: {error} The bastion "
        "drops the route when its lease expires."
    )


def _remove_local_key(identity_files: list[str]) -> None:
    for name in identity_files:
        path = Path(name)
        if path.name.startswith(LOCAL_KEY_PREFIX):
            path.unlink(missing_ok=True)
