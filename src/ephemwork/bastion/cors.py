"""Answers to CORS preflights for the route header, from an origin allowlist, with no I/O.

A browser sends a preflight (``OPTIONS`` with ``Access-Control-Request-Method``) before a
cross-origin request with ``X-Ephemwork``, and the preflight itself carries no custom
header, so the bastion cannot know which laptop would answer it. The load balancer sends
preflights that list ``x-ephemwork`` to the bastion, which answers them itself.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from multidict import CIMultiDict, CIMultiDictProxy

from ephemwork.wire import ROUTE_HEADER

# Seconds a browser may cache a preflight answer. Chromium caps this at 7200 s.
PREFLIGHT_MAX_AGE = 600


class OriginAllowlist:
    """Origins allowed to send the route header, as shell-style patterns.

    ``https://*.staging.example.com`` matches ``https://app.staging.example.com``. Matching
    ignores case, because scheme and host are case-insensitive; ``*`` alone matches any
    origin, which suits only a staging environment that holds no secrets.
    """

    patterns: tuple[str, ...]

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        self.patterns = tuple(pattern.strip().lower().rstrip("/") for pattern in patterns)

    def allows(self, origin: str) -> bool:
        """Return whether *origin* matches one of the patterns."""
        origin = origin.strip().lower()
        if not origin or origin == "null":
            return False
        return any(fnmatch.fnmatchcase(origin, pattern) for pattern in self.patterns)


def is_route_preflight(method: str, headers: CIMultiDictProxy[str]) -> bool:
    """Return whether a request is a CORS preflight that lists the route header."""
    if method != "OPTIONS" or "Access-Control-Request-Method" not in headers:
        return False
    requested = {
        name.strip().lower()
        for value in headers.getall("Access-Control-Request-Headers", [])
        for name in value.split(",")
    }
    return ROUTE_HEADER.lower() in requested


def preflight_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """Return the CORS headers that allow the preflight with request *headers*.

    The requested method and headers are echoed, so a preflight never fails on a header
    the allowlist author did not foresee; only the origin is checked.
    """
    answer: CIMultiDict[str] = CIMultiDict()
    answer["Access-Control-Allow-Origin"] = headers["Origin"]
    answer["Access-Control-Allow-Credentials"] = "true"
    answer["Access-Control-Allow-Methods"] = headers["Access-Control-Request-Method"]
    requested = ", ".join(headers.getall("Access-Control-Request-Headers", []))
    if requested:
        answer["Access-Control-Allow-Headers"] = requested
    answer["Access-Control-Max-Age"] = str(PREFLIGHT_MAX_AGE)
    answer["Vary"] = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
    return answer


def actual_response_headers(origin: str) -> CIMultiDict[str]:
    """Return the CORS headers added to a routed response for an allowed *origin*.

    The browser checks the actual response as well as the preflight; these are added only
    when the dev server set no Access-Control-Allow-Origin of its own.
    """
    answer: CIMultiDict[str] = CIMultiDict()
    answer["Access-Control-Allow-Origin"] = origin
    answer["Access-Control-Allow-Credentials"] = "true"
    return answer
