"""The ``ephemwork`` route cookie: reading it from requests and building Set-Cookie values.

A browser cannot add ``X-Ephemwork`` to a page load or to a WebSocket handshake, so
``?ephemwork=<user>:<service>`` on any URL makes the bastion set this cookie, and the cookie
then routes like the header. The cookie has no Domain attribute, so the browser sends it only
to the host that set it: the staging host in front of the bastion.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import unquote_plus

ROUTE_COOKIE = "ephemwork"
ROUTE_QUERY_PARAMETER = "ephemwork"


def cookie_values(headers: Iterable[str], name: str = ROUTE_COOKIE) -> list[str]:
    """Return the values of every cookie called *name* in the ``Cookie`` headers, in order.

    Browsers send one cookie per name and path, most specific path first (RFC 6265 section
    5.4), so callers use the first value.
    """
    values: list[str] = []
    for header in headers:
        for pair in header.split(";"):
            key, equals, value = pair.strip(" \t").partition("=")
            if equals and key == name:
                values.append(value.strip(" \t").removeprefix('"').removesuffix('"'))
    return values


def route_cookie(value: str, *, secure: bool) -> str:
    """Return the Set-Cookie value that stores the route *value*; an empty *value* clears it.

    HttpOnly keeps page scripts from reading it; SameSite=Lax still sends it on top-level
    navigations and to same-site requests, which include WebSocket handshakes from pages of
    the same staging domain.
    """
    parts = [f"{ROUTE_COOKIE}={value}", "Path=/", "HttpOnly", "SameSite=Lax"]
    if not value:
        parts.append("Max-Age=0")
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


def split_route_parameter(raw_query: str) -> tuple[list[str], str]:
    """Split a raw query string into the ``ephemwork`` parameter values and the rest.

    The rest keeps every other parameter in its original order and encoding, so the
    redirect leads to the same URL without the parameter.
    """
    found: list[str] = []
    kept: list[str] = []
    for item in raw_query.split("&"):
        if not item:
            continue
        name, _, value = item.partition("=")
        if unquote_plus(name) == ROUTE_QUERY_PARAMETER:
            found.append(unquote_plus(value))
        else:
            kept.append(item)
    return found, "&".join(kept)


def same_origin_location(raw_path: str, raw_query: str) -> str:
    """Return the redirect target for *raw_path* and *raw_query* on the host that set the cookie.

    A Location that starts with ``//`` names another host (a scheme-relative reference, RFC
    3986 section 4.2), and browsers read ``\\`` as ``/`` and remove tabs and newlines from
    URLs (WHATWG URL standard), so ``/\\evil.example/`` leads off-site too. Collapsing every
    leading ``/``, ``\\``, tab, CR and LF into one ``/`` keeps the redirect on this host.
    """
    path = "/" + raw_path.lstrip("/\\\t\r\n")
    return path + (f"?{raw_query}" if raw_query else "")
