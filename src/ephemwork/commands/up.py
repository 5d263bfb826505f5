"""``ephemwork up``: start dev servers, connect to the bastion and hold their routes.

The steps run in this order, each undone in reverse when the command stops:

1. claim each ``user:service`` in local state, so a second ``up`` fails before it starts a
   dev server on the same port;
2. build, start and health-check each dev server;
3. reach the bastion (in local mode, start one in this process) and open one SSH
   connection;
4. register each route and open its reverse forward, then print how to reach it;
5. hold until Ctrl-C, SIGTERM (sent by ``ephemwork down``), a lost route or a dev server
   that exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

import click
import structlog

from ephemwork.client.control import ControlClient
from ephemwork.client.state import (
    SessionRecord,
    StateStore,
    is_process_alive,
    process_start_ticks,
)
from ephemwork.client.supervisor import DevServer
from ephemwork.client.tunnel import Route, client_description, connect, curl_hint
from ephemwork.commands.stop import StopRequested, StopSignal
from ephemwork.config import Config, ServiceConfig, load_config
from ephemwork.errors import DevServerError, StateError, TunnelError
from ephemwork.identity import resolve_user
from ephemwork.targets import open_target
from ephemwork.wire import RouteKey

log = structlog.get_logger()

# Seconds between deregistering the routes and closing the SSH connection, so responses
# to requests that the bastion forwarded just before deregistration are not cut off.
DRAIN_SECONDS = 0.5

# Seconds that --takeover waits for the previous `up` to stop after SIGTERM.
TAKEOVER_WAIT = 10.0


async def run_up(config_path: Path | None, service_names: list[str], *, takeover: bool) -> None:
    """Run ``ephemwork up SERVICE…`` until it is stopped."""
    config = load_config(config_path)
    services = [config.service(name) for name in dict.fromkeys(service_names)]
    user = resolve_user()
    store = StateStore()

    with StopSignal() as stop:
        try:
            await _serve(config, services, user, store, stop, takeover=takeover)
        except StopRequested:
            pass

    click.echo(f"Stopped ({stop.signal_name or 'done'}); routes deregistered.")


async def _serve(
    config: Config,
    services: list[ServiceConfig],
    user: str,
    store: StateStore,
    stop: StopSignal,
    *,
    takeover: bool,
) -> None:
    keys = {service.name: RouteKey(user, service.name) for service in services}

    async with contextlib.AsyncExitStack() as stack:
        for service in services:
            await _claim(store, keys[service.name], service, stop, takeover=takeover)
            stack.callback(store.remove, user, service.name)

        dev_servers: list[DevServer] = []
        for service in services:
            dev_server = DevServer(service, config.root)
            await stack.enter_async_context(dev_server)
            await stop.race(dev_server.build())
            await stop.race(dev_server.start())
            await stop.race(dev_server.wait_healthy())
            dev_servers.append(dev_server)

        target = await stack.enter_async_context(open_target(config.tunnel))
        conn = await stop.race(connect(target))
        stack.push_async_callback(conn.wait_closed)
        stack.callback(conn.close)
        # Runs after the routes are deregistered, before the connection closes.
        stack.push_async_callback(asyncio.sleep, DRAIN_SECONDS)
        control = ControlClient(conn, target.control_port)

        routes: list[Route] = []
        for service in services:
            key = keys[service.name]
            route = Route(conn, control, key, service.port, client_description(), takeover=takeover)
            session = await stop.race(route.open())
            stack.push_async_callback(route.wait_closed)
            stack.callback(route.close)
            routes.append(route)

            store.update(
                user,
                service.name,
                bastion_port=session.port,
                session_id=session.session_id,
                tunnel=target.description,
                state="serving",
            )
            log.info(
                "route.ready",
                route=key.header_value,
                session_id=session.session_id,
                bastion_port=session.port,
                local_port=service.port,
            )
            click.echo(f"{key.header_value} is routed to 127.0.0.1:{service.port}. Try:")
            click.echo(f"  {curl_hint(target, key)}")

        click.echo("Press Ctrl-C to stop.")
        await stop.race(_hold(routes, dev_servers))


async def _hold(routes: list[Route], dev_servers: list[DevServer]) -> None:
    """Return never; raise when a route is lost or a dev server exits."""
    watchers = [
        asyncio.create_task(route.wait_lost(), name=f"ephemwork-watch-route-{route.key}")
        for route in routes
    ] + [
        asyncio.create_task(dev.wait_exited(), name=f"ephemwork-watch-dev-{dev.name}")
        for dev in dev_servers
    ]
    try:
        done, _ = await asyncio.wait(watchers, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for watcher in watchers:
            watcher.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)

    for finished in done:
        error = finished.exception()
        if error is not None:
            raise error
        if finished.get_name().startswith("ephemwork-watch-dev-"):
            name = finished.get_name().removeprefix("ephemwork-watch-dev-")
            raise DevServerError(
                f"The dev server of {name!r} exited with code {finished.result()}; "
                "its route is closed. Fix the error above and run `ephemwork up` again."
            )

    raise TunnelError("The route to the bastion was closed unexpectedly.")


async def _claim(
    store: StateStore, key: RouteKey, service: ServiceConfig, stop: StopSignal, *, takeover: bool
) -> None:
    """Record ``key`` as served by this process, stopping a previous ``up`` with --takeover."""
    existing = store.get(key.user, key.service)
    if existing is not None and is_process_alive(existing.pid, existing.pid_start_ticks):
        if not takeover:
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(existing.started_at))
            raise StateError(
                f"{key.header_value} is already served by `ephemwork up` (pid {existing.pid}, "
                f"started {started}). Stop it with `ephemwork down {key.service}`, or pass "
                "--takeover to replace it."
            )
        await stop.race(_stop_process(existing))

    store.add(
        SessionRecord(
            user=key.user,
            service=key.service,
            local_port=service.port,
            bastion_port=0,
            session_id="",
            pid=os.getpid(),
            pid_start_ticks=process_start_ticks(os.getpid()),
            started_at=time.time(),
            tunnel="",
            state="starting",
        )
    )


async def _stop_process(record: SessionRecord) -> None:
    """Send SIGTERM to the ``up`` process of *record* and wait until it is gone."""
    log.info("takeover.stopping", route=record.header_value, pid=record.pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(record.pid, signal.SIGTERM)

    deadline = time.monotonic() + TAKEOVER_WAIT
    while is_process_alive(record.pid, record.pid_start_ticks):
        if time.monotonic() > deadline:
            raise StateError(
                f"`ephemwork up` (pid {record.pid}) did not stop within {TAKEOVER_WAIT:.0f} s "
                f"of SIGTERM. Stop it by hand (kill {record.pid}) and try again."
            )
        await asyncio.sleep(0.1)
