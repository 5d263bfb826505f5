"""structlog set-up: readable lines for people, JSON lines for machines."""

from __future__ import annotations

import logging
import os
import sys
from typing import Literal, TextIO

import structlog

LogFormat = Literal["auto", "console", "json"]


def resolve_format(
    requested: LogFormat, stream: TextIO, *, server: bool
) -> Literal["console", "json"]:
    """Pick the renderer for *requested*.

    ``auto`` means console for client commands, which a person reads, and for a *server*
    on a terminal; a server whose log goes to a file, a pipe or the journal writes JSON.
    systemd sets ``JOURNAL_STREAM`` for the services it starts.
    """
    if requested != "auto":
        return requested
    if not server:
        return "console"
    if os.environ.get("JOURNAL_STREAM"):
        return "json"
    return "console" if stream.isatty() else "json"


def configure_logging(
    log_format: LogFormat = "auto",
    level: str = "info",
    stream: TextIO | None = None,
    *,
    server: bool = False,
) -> None:
    """Configure structlog for this process; call once, before the first log line."""
    out = stream if stream is not None else sys.stderr
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if resolve_format(log_format, out, server=server) == "json":
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=out.isatty()))

    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=True,
    )
