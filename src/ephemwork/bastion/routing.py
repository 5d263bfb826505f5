"""Selection of a request's route from its header, baggage or cookie, with no I/O.

A request names its route in one of three places, checked in this order, and the first
place that is present decides, even when a later one names another route:

1. the ``X-Ephemwork: <user>:<service>`` header;
2. a ``ephemwork=<user>:<service>`` member of the W3C ``baggage`` header;
3. the ``ephemwork`` cookie, which ``?ephemwork=<user>:<service>`` sets.

`select_route` returns a `SelectedRoute`, ``None`` (no route anywhere), or raises an
`InvalidRouteError` whose message is one line that can be returned to the caller as is.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import attrs
from multidict import CIMultiDictProxy

from ephemwork.bastion.baggage import BAGGAGE_HEADER, baggage_values
from ephemwork.bastion.cookies import ROUTE_COOKIE, cookie_values
from ephemwork.identity import NAME_PATTERN, NAME_RULE
from ephemwork.wire import ROUTE_HEADER, RouteKey

# A longer value cannot be two valid names, and the limit keeps echoed values short.
MAX_ROUTE_VALUE_BYTES = 128

_FORBIDDEN_CHARACTERS = {"\r": "CR", "\n": "LF", "\0": "NUL"}


class InvalidRouteError(ValueError):
    """A route header value is malformed; the message is one line for the HTTP caller."""


RouteSource = Literal["header", "baggage", "cookie"]

_SOURCE_NAMES: dict[RouteSource, str] = {
    "header": ROUTE_HEADER,
    "baggage": "baggage member 'ephemwork'",
    "cookie": f"cookie {ROUTE_COOKIE!r}",
}


@attrs.frozen
class SelectedRoute:
    """The route of a request and where the request named it."""

    route: RouteKey
    source: RouteSource


def parse_route_value(value: str, *, source: str = ROUTE_HEADER) -> RouteKey:
    """Parse one ``<user>:<service>`` value, or raise `InvalidRouteError` naming *source*."""
    for character, name in _FORBIDDEN_CHARACTERS.items():
        if character in value:
            raise InvalidRouteError(f"invalid {source} value: it contains {name}")

    # Optional whitespace around a field value is not part of it (RFC 9110 section 5.5).
    value = value.strip(" \t")

    size = len(value.encode("utf-8", errors="surrogatepass"))
    if size > MAX_ROUTE_VALUE_BYTES:
        raise InvalidRouteError(
            f"invalid {source} value: it is {size} bytes long, "
            f"the maximum is {MAX_ROUTE_VALUE_BYTES}"
        )

    if not value:
        raise InvalidRouteError(f"invalid {source} value: it is empty; use <user>:<service>")

    user, colon, service = value.partition(":")
    if not colon:
        raise InvalidRouteError(
            f"invalid {source} value {value!r}: missing ':'; use <user>:<service>"
        )

    for kind, part in (("user", user), ("service", service)):
        if not part:
            raise InvalidRouteError(
                f"invalid {source} value {value!r}: the {kind} part is empty; use <user>:<service>"
            )
        if NAME_PATTERN.fullmatch(part) is None:
            raise InvalidRouteError(
                f"invalid {source} value {value!r}: the {kind} {part!r} is not a "
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


def select_route(headers: CIMultiDictProxy[str]) -> SelectedRoute | None:
    """Return the route that *headers* select, by header, then baggage, then cookie.

    Raises `InvalidRouteError` when the place that decides holds a malformed value or
    values that disagree. A malformed value in a place of lower precedence is ignored.
    """
    header_route = route_from_header_values(headers.getall(ROUTE_HEADER, []))
    if header_route is not None:
        return SelectedRoute(header_route, "header")

    try:
        members = baggage_values(headers.getall(BAGGAGE_HEADER, []))
    except UnicodeDecodeError:
        raise InvalidRouteError(
            f"invalid {_SOURCE_NAMES['baggage']}: its percent-encoding is not UTF-8"
        ) from None
    if members:
        return SelectedRoute(_single_route(members, "baggage"), "baggage")

    cookies = cookie_values(headers.getall("Cookie", []))
    if cookies:
        # Browsers send the cookie with the most specific path first.
        route = parse_route_value(cookies[0], source=_SOURCE_NAMES["cookie"])
        return SelectedRoute(route, "cookie")

    return None


def _single_route(values: list[str], source: RouteSource) -> RouteKey:
    name = _SOURCE_NAMES[source]
    routes = {parse_route_value(value, source=name) for value in values}
    if len(routes) > 1:
        names = ", ".join(sorted(repr(str(route)) for route in routes))
        raise InvalidRouteError(f"several {name} values disagree: {names}")
    return routes.pop()
