"""Parsing of the W3C ``baggage`` header, with no I/O.

Services instrumented with OpenTelemetry pass ``baggage`` on to the services they call, so
a member ``ephemwork=<user>:<service>`` keeps a route alive past the first hop. The format
is ``key=value;property, key=value`` with optional whitespace around every part and
percent-encoded values (https://www.w3.org/TR/baggage/).
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import unquote

BAGGAGE_HEADER = "baggage"
BAGGAGE_KEY = "ephemwork"


def baggage_values(headers: Iterable[str], key: str = BAGGAGE_KEY) -> list[str]:
    """Return the percent-decoded values of every *key* member in the ``baggage`` headers.

    Members without ``=`` are skipped, as the specification says an invalid member may be
    dropped; properties after ``;`` are ignored.
    """
    values: list[str] = []
    for header in headers:
        for member in header.split(","):
            pair = member.split(";", 1)[0]
            name, equals, value = pair.partition("=")
            if not equals or name.strip(" \t") != key:
                continue
            values.append(unquote(value.strip(" \t"), errors="strict"))
    return values
