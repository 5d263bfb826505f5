"""Checks of what enters and leaves the proxy: methods, request framing, response headers.

Everything here is a plain function with no I/O. aiohttp's parser (llhttp) already rejects
most malformed framing, such as Content-Length with Transfer-Encoding or two different
Content-Length values; these checks repeat the ones that decide whether a request could be
read differently by the dev server, so a parser change cannot reopen them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from multidict import CIMultiDictProxy

# The methods of RFC 9110 and PATCH (RFC 5789), without CONNECT, which would turn the proxy
# into a TCP relay, and TRACE, which echoes credentials back to scripts.
STANDARD_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})

# Methods from the IANA HTTP Method Registry that WebDAV, CalDAV and versioning use.
REGISTERED_EXTENSION_METHODS = frozenset(
    {
        "ACL",
        "BASELINE-CONTROL",
        "BIND",
        "CHECKIN",
        "CHECKOUT",
        "COPY",
        "LABEL",
        "LINK",
        "LOCK",
        "MERGE",
        "MKACTIVITY",
        "MKCALENDAR",
        "MKCOL",
        "MKREDIRECTREF",
        "MKWORKSPACE",
        "MOVE",
        "ORDERPATCH",
        "PROPFIND",
        "PROPPATCH",
        "QUERY",
        "REBIND",
        "REPORT",
        "SEARCH",
        "UNBIND",
        "UNCHECKOUT",
        "UNLINK",
        "UNLOCK",
        "UPDATE",
        "UPDATEREDIRECTREF",
        "VERSION-CONTROL",
    }
)

ALLOWED_METHODS = STANDARD_METHODS | REGISTERED_EXTENSION_METHODS

# The value of the Allow header on a 405 answer.
ALLOW_HEADER_VALUE = ", ".join(sorted(ALLOWED_METHODS))


# Regular expressions rather than loops over bytes, because every relayed response passes
# through these checks.
_BAD_NAME_BYTE = re.compile(rb"[\x00-\x20:\x7f]")
_BAD_VALUE_BYTE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class FramingError(ValueError):
    """A request's framing headers could let the dev server see another request boundary."""


def check_request_framing(headers: CIMultiDictProxy[str], version: tuple[int, int]) -> None:
    """Raise `FramingError` with a one-line reason if the request's framing is ambiguous."""
    transfer_encodings = headers.getall("Transfer-Encoding", [])
    lengths = headers.getall("Content-Length", [])

    if transfer_encodings and lengths:
        raise FramingError("the request has both Content-Length and Transfer-Encoding")
    if len(lengths) > 1:
        raise FramingError("the request has more than one Content-Length header")
    if lengths and not lengths[0].isdigit():
        raise FramingError(f"Content-Length {lengths[0]!r} is not a number")

    if transfer_encodings:
        if version < (1, 1):
            raise FramingError("an HTTP/1.0 request cannot use Transfer-Encoding")
        codings = [c.strip().lower() for value in transfer_encodings for c in value.split(",")]
        if codings != ["chunked"]:
            raise FramingError(
                f"Transfer-Encoding {', '.join(transfer_encodings)!r} is not supported; "
                "use 'chunked' alone"
            )


def invalid_header_bytes(raw_headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """Return the name of the first header whose name or value has a control byte, or None.

    HTAB is allowed in values; every other byte below 0x20, and DEL, is not (RFC 9110
    section 5.5). Names also may not contain a space or a colon.
    """
    for name, value in raw_headers:
        if _BAD_NAME_BYTE.search(name) is not None or _BAD_VALUE_BYTE.search(value) is not None:
            return name
    return None


def invalid_response_header(raw_headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """Return what is wrong with the first header the proxy cannot relay unchanged, or None.

    The result names the header and the problem, for example ``'X-Bad' with a control
    character``. Besides control bytes, it catches values that are not UTF-8, such as a
    Latin-1 ``0xE9``. RFC 9110 allows such bytes (obs-text), but aiohttp 3.14 decodes header
    values as UTF-8 with ``surrogateescape`` and its header writer drops the surrogates, so
    the caller would get the value with those bytes missing. UTF-8 values pass through
    byte for byte.
    """
    bad_name = invalid_header_bytes(raw_headers)
    if bad_name is not None:
        return f"{bad_name.decode('latin-1')!r} with a control character"

    for name, value in raw_headers:
        if not name.isascii():
            return f"{name.decode('latin-1')!r} with a byte above 0x7F in its name"
        if value.isascii():
            continue
        try:
            value.decode("utf-8")
        except UnicodeDecodeError as exc:
            return (
                f"{name.decode('latin-1')!r} with the byte 0x{value[exc.start]:02x}, which is "
                "not UTF-8 and which the bastion cannot pass on unchanged"
            )
    return None


def upgrade_protocols(headers: CIMultiDictProxy[str]) -> list[str]:
    """Return the lower-case protocol names a request's Upgrade headers ask for.

    Upgrade counts only when Connection lists it (RFC 9110 section 7.8); otherwise it is an
    ordinary hop-by-hop header that the proxy drops.
    """
    connection = {
        token.strip().lower()
        for value in headers.getall("Connection", [])
        for token in value.split(",")
    }
    if "upgrade" not in connection:
        return []
    return [
        token.strip().lower()
        for value in headers.getall("Upgrade", [])
        for token in value.split(",")
        if token.strip()
    ]
