"""Protocol constants and the version check that both sides run."""

from __future__ import annotations

# Raise this when a control API message changes shape; both sides reject any other value,
# so an old laptop and a new bastion fail with a clear message instead of a confusing 400.
PROTOCOL_VERSION = 2

# Every control API request and response carries the sender's protocol version here.
PROTOCOL_HEADER = "X-Ephemwork-Protocol"

# The header the staging ALB matches on: ``X-Ephemwork: <user>:<service>``.
ROUTE_HEADER = "X-Ephemwork"

CONTROL_API_PREFIX = "/v1"


def check_protocol(received: str | None, *, peer: str) -> str | None:
    """Return a one-line problem with the *received* protocol header, or ``None`` if it matches.

    *peer* names the other side ("laptop" or "bastion") so the message says which program to
    upgrade.
    """
    if received is None:
        return (
            f"The {peer} sent no {PROTOCOL_HEADER} header; it is not ephemwork or is older "
            f"than protocol version {PROTOCOL_VERSION}. Upgrade ephemwork on the {peer}."
        )

    if received.strip() != str(PROTOCOL_VERSION):
        return (
            f"Protocol version mismatch: the {peer} speaks version {received.strip()!r}, "
            f"this side speaks {PROTOCOL_VERSION}. Install the same ephemwork release "
            "on the laptop and the bastion."
        )

    return None
