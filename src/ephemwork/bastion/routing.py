"""Parsing of the ``X-Ephemwork: <user>:<service>`` route header, with no I/O.

The proxy calls `route_from_header_values` with every value of the header in a request
and gets a `RouteKey`, ``None`` (no header), or an `InvalidRouteError` whose message is
one line that can be returned to the caller as is.
"""

from __future__ import annotations

from collections.abc import Iterable

from ephemwork.identity import NAME_PATTERN, NAME_RULE
from ephemwork.wire import ROUTE_HEADER, RouteKey

# A longer value cannot be two valid names, and the limit keeps echoed values short.
MAX_ROUTE_VALUE_BYTES = 128

_FORBIDDEN_CHARACTERS = {"\r": "CR", "\n": "LF", "\0": "NUL"}


class InvalidRouteError(ValueError):
    """A route header value is malformed; the message is one line for the HTTP caller."""


def parse_route_value(value: str) -> RouteKey:
    """Parse one ``<user>:<service>`` header value, or raise `InvalidRouteError`."""
    for character, name in _FORBIDDEN_CHARACTERS.items():
        if character in value:
            raise InvalidRouteError(f"invalid {ROUTE_HEADER} value: it contains {name}")

    # Optional whitespace around a field value is not part of it (RFC 9110 section 5.5).
    value = value.strip(" \t")

    size = len(value.encode("utf-8", errors="surrogatepass"))
    if size > MAX_ROUTE_VALUE_BYTES:
        raise InvalidRouteError(
            f"invalid {ROUTE_HEADER} value: it is {size} bytes long, "
            f"the maximum is {MAX_ROUTE_VALUE_BYTES}"
        )

    if not value:
        raise InvalidRouteError(f"invalid {ROUTE_HEADER} value: it is empty; use <user>:<service>")

    user, colon, service = value.partition(":")
    if not colon:
        raise InvalidRouteError(
            f"invalid {ROUTE_HEADER} value {value!r}: missing ':'; use <user>:<service>"
        )

    for kind, part in (("user", user), ("service", service)):
        if not part:
            raise InvalidRouteError(
                f"invalid {ROUTE_HEADER} value {value!r}: the {kind} part is empty; "
                "use <user>:<service>"
            )
        if NAME_PATTERN.fullmatch(part) is None:
            raise InvalidRouteError(
                f"invalid {ROUTE_HEADER} value {value!r}: the {kind} {part!r} is not a "
                f"valid name; use {NAME_RULE}"
            )

    return RouteKey(user, service)


def route_from_header_values(values: Iterable[str]) -> RouteKey | None:
    """Return the route that the ``X-Ephemwork`` header values select, or ``None`` if absent.

    A recipient may combine repeated header lines into one comma-separated line (RFC 9110
    section 5.3), so each value is split on commas first. Identical duplicates select one
    route; values that name different routes raise `InvalidRouteError`.
    """
    elements: list[str] = []
    for value in values:
        elements.extend(value.split(","))

    if not elements:
        return None

    routes = [parse_route_value(element) for element in elements]
    distinct = sorted(set(routes), key=str)
    if len(distinct) > 1:
        names = ", ".join(repr(str(route)) for route in distinct)
        raise InvalidRouteError(f"several {ROUTE_HEADER} headers disagree: {names}")

    return distinct[0]
