"""``ephemwork up``: start dev servers, connect to the bastion and hold their routes.

The steps run in this order, each undone in reverse when the command stops:

1. claim each ``user:service`` in local state, so a second ``up`` fails before it starts a
   dev server on the same port;
2. build, start and health-check each dev server;
3. reach the bastion (in local mode, start one in this process) and open one SSH
   connection;
4. register each route and open its reverse forward, then print how to reach it;
5. hold until Ctrl-C or SIGTERM, reconnecting after a lost SSH connection and restarting a
   dev server that exits (see `ephemwork.client.link` and `ephemwork.client.restarts`);
   ``ephemwork down SERVICE`` stops one service of several with SIGUSR1.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import time
from pathlib import Path

import attrs
import click
import structlog

from ephemwork.client.endpoint import endpoint_of
from ephemwork.client.forwarding import ServiceGate
from ephemwork.client.link import Link, close_quietly
from ephemwork.client.restarts import keep_running
from ephemwork.client.stale import clean_stale_record
from ephemwork.client.state import (
    BastionEndpoint,
    SessionRecord,
    StateStore,
    is_process_alive,
    process_start_ticks,
    unproven_process_runs,
)
from ephemwork.client.supervisor import DevServer
from ephemwork.client.tunnel import TunnelTarget, client_description, curl_hint
from ephemwork.commands.down import unproven_message
from ephemwork.commands.stop import StopRequested, StopSignal
from ephemwork.config import Config, LocalTunnel, ServiceConfig, SshTunnel, load_config
from ephemwork.errors import DevServerError, StateError
from ephemwork.identity import resolve_user
from ephemwork.targets import check_ssh_files, open_target
from ephemwork.wire import RouteKey, Session

log = structlog.get_logger()

# Seconds that --takeover waits for the previous `up` to stop after SIGTERM.
TAKEOVER_WAIT = 10.0


async def run_up(config_path: Path | None, service_names: list[str], *, takeover: bool) -> None:
    """Run ``ephemwork up SERVICE…`` until it is stopped."""
    config = load_config(config_path)
    services = [config.service(name) for name in dict.fromkeys(service_names)]
    user = resolve_user()
    store = StateStore()

    progress = _Progress()
    with StopSignal() as stop:
        try:
            await _serve(config, services, user, store, stop, progress, takeover=takeover)
        except StopRequested:
            pass

    click.echo(f"Stopped ({stop.signal_name or 'done'}){progress.describe()}.")


class _Progress:
    """How far ``up`` got, for the last line it prints."""

    dev_servers: list[str]
    routes: list[str]

    def __init__(self) -> None:
        self.dev_servers = []
        self.routes = []

    def describe(self) -> str:
        if self.routes:
            return "; routes deregistered"
        if self.dev_servers:
            return (
                f" before any route was registered; stopped the dev server of "
                f"{', '.join(self.dev_servers)}"
            )
        return " before any dev server started"


async def _serve(
    config: Config,
    services: list[ServiceConfig],
    user: str,
    store: StateStore,
    stop: StopSignal,
    progress: _Progress,
    *,
    takeover: bool,
) -> None:
    keys = {service.name: RouteKey(user, service.name) for service in services}

    replaced: dict[str, str | None] = {}
    async with contextlib.AsyncExitStack() as stack:
        for service in services:
            replaced[service.name] = await _claim(
                store, keys[service.name], service, stop, takeover=takeover
            )
            stack.callback(store.remove, user, service.name)

        if isinstance(config.tunnel, LocalTunnel):
            # Imported here so that remote tunnel types never load the bastion.
            from ephemwork.local_mode import check_proxy_port_free

            # After the claims, because --takeover frees the port of the `up` it replaces.
            check_proxy_port_free(config.tunnel, config.path)
        elif isinstance(config.tunnel, SshTunnel):
            check_ssh_files(config.tunnel)

        dev_servers: dict[str, DevServer] = {}
        for service in services:
            dev_server = DevServer(
                service, config.root, on_started=lambda dev: _record_dev_server(store, user, dev)
            )
            await stack.enter_async_context(dev_server)
            await stop.race(dev_server.build())
            await stop.race(dev_server.start())
            progress.dev_servers.append(service.name)
            await stop.race(dev_server.wait_healthy())
            dev_servers[service.name] = dev_server

        target = await stack.enter_async_context(open_target(config.tunnel))
        endpoint = endpoint_of(target, in_process=isinstance(config.tunnel, LocalTunnel))
        link = Link(
            target,
            client_description(),
            takeover=takeover,
            notify=click.echo,
            on_session=lambda key, session: _record_session(store, key, session, target, endpoint),
            on_lost=lambda problem: _record_error(store, user, list(keys), problem),
        )
        await stop.race(link.connect())
        stack.push_async_callback(close_quietly, link)

        gates: dict[str, ServiceGate] = {}
        for service in services:
            key = keys[service.name]
            gates[service.name] = ServiceGate(service.name, service.port)
            session = await stop.race(
                link.add_route(
                    key,
                    service.port,
                    gates[service.name],
                    replaces_session_id=replaced[service.name],
                )
            )
            progress.routes.append(key.header_value)
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
        holder = _Holder(link, store, user, dev_servers, gates, stop.down_requested)
        await stop.race(holder.hold())


def _record_session(
    store: StateStore,
    key: RouteKey,
    session: Session,
    target: TunnelTarget,
    endpoint: BastionEndpoint | None,
) -> None:
    with store.transaction() as records:
        for index, record in enumerate(records):
            if (record.user, record.service) != (key.user, key.service):
                continue
            # A reconnect must not undo a pending `ephemwork down SERVICE`.
            state = "stop_requested" if record.state == "stop_requested" else "serving"
            records[index] = attrs.evolve(
                record,
                bastion_port=session.port,
                session_id=session.session_id,
                tunnel=target.description,
                state=state,
                bastion=endpoint,
            )


def _record_error(store: StateStore, user: str, services: list[str], problem: str) -> None:
    """Keep *problem*, with the local time, as the last error of *services* for `status`."""
    stamped = f"{time.strftime('%H:%M:%S')} {problem}"
    with store.transaction() as records:
        for index, record in enumerate(records):
            if record.user == user and record.service in services and record.pid == os.getpid():
                records[index] = attrs.evolve(record, last_error=stamped)


def _record_dev_server(store: StateStore, user: str, dev: DevServer) -> None:
    pgid = dev.pid
    store.update(
        user,
        dev.name,
        dev_pgid=pgid,
        dev_start_ticks=process_start_ticks(pgid) if pgid is not None else None,
        dev_marker=dev.marker,
    )


class _Holder:
    """The running part of ``up``: the link, one restart loop per dev server, ``down`` requests."""

    _link: Link
    _store: StateStore
    _user: str
    _dev_servers: dict[str, DevServer]
    _gates: dict[str, ServiceGate]
    _services: dict[str, asyncio.Task[None]]
    _down_requested: asyncio.Event
    _failures: list[DevServerError]

    def __init__(
        self,
        link: Link,
        store: StateStore,
        user: str,
        dev_servers: dict[str, DevServer],
        gates: dict[str, ServiceGate],
        down_requested: asyncio.Event,
    ) -> None:
        self._link = link
        self._store = store
        self._user = user
        self._dev_servers = dev_servers
        self._gates = gates
        self._services = {}
        self._down_requested = down_requested
        self._failures = []

    async def hold(self) -> None:
        """Run until every service stopped; raise the link's fatal error or a dev server's."""
        link_task = asyncio.create_task(self._link.run(), name="ephemwork-link")
        down_task = asyncio.create_task(self._watch_down_requests(), name="ephemwork-down")
        for name, dev in self._dev_servers.items():
            self._services[name] = asyncio.create_task(
                keep_running(
                    dev,
                    self._gates[name],
                    click.echo,
                    record_error=functools.partial(_record_error, self._store, self._user, [name]),
                ),
                name=f"ephemwork-keep-{name}",
            )

        try:
            while self._services:
                waiting = {link_task, down_task, *self._services.values()}
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if link_task in done or down_task in done:
                    # Both run until cancelled, so finishing means they raised.
                    (link_task if link_task in done else down_task).result()
                for name, task in list(self._services.items()):
                    if task in done:
                        await self._end_service(name, task)
        finally:
            tasks = [link_task, down_task, *self._services.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._failures:
            raise self._failures[-1]

    async def _end_service(self, name: str, task: asyncio.Task[None]) -> None:
        del self._services[name]
        error = task.exception() if not task.cancelled() else None
        if error is not None and not isinstance(error, DevServerError):
            # A bug in the restart loop must not end `up` with a traceback. The other
            # services keep running, and this one stops like a dev server that failed.
            log.error("service.restart_loop_failed", service=name, exc_info=error)
            error = DevServerError(
                f"{name}: restarting the dev server failed unexpectedly ({error!r}), so its "
                "route is closed. Run `ephemwork up` again; if this repeats, report it with "
                "the output above."
            )

        key = RouteKey(self._user, name)
        await self._link.remove_route(key)
        await self._dev_servers[name].stop()
        self._store.remove(self._user, name)
        if isinstance(error, DevServerError):
            self._failures.append(error)
            if self._services:
                click.echo(str(error))
        else:
            click.echo(f"Stopped {key.header_value} (ephemwork down); route deregistered.")

    async def _watch_down_requests(self) -> None:
        while True:
            await self._down_requested.wait()
            self._down_requested.clear()
            for record in self._store.list_records():
                requested = record.pid == os.getpid() and record.state == "stop_requested"
                task = self._services.get(record.service)
                if requested and record.user == self._user and task is not None:
                    log.info("down.service_requested", route=record.header_value)
                    task.cancel()


async def _claim(
    store: StateStore, key: RouteKey, service: ServiceConfig, stop: StopSignal, *, takeover: bool
) -> str | None:
    """Record ``key`` as served by this process, stopping a previous ``up`` with --takeover.

    Returns the session id of the previous ``up``, if local state recorded one: the bastion
    accepts a takeover of a live session only with that id.
    """
    existing = store.get(key.user, key.service)
    previous_session_id = (existing.session_id or None) if existing is not None else None
    if existing is not None and not is_process_alive(existing.pid, existing.pid_start_ticks):
        if unproven_process_runs(existing.pid, existing.pid_start_ticks):
            click.echo(unproven_message(existing.pid, key.header_value))
        else:
            click.echo(
                f"`ephemwork up` (pid {existing.pid}) for {key.header_value} is no longer "
                "running; cleaning up after it."
            )
        await stop.race(clean_stale_record(existing, click.echo))
    elif existing is not None:
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
    return previous_session_id


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
