"""Types and encoding shared by the laptop (client mode) and the bastion.

This package imports nothing else of ephemwork, so both modes can depend on it.
"""

from ephemwork.wire.codec import WireFormatError, converter, decode, encode
from ephemwork.wire.protocol import (
    CONTROL_API_PREFIX,
    PROTOCOL_HEADER,
    PROTOCOL_VERSION,
    ROUTE_HEADER,
    check_protocol,
)
from ephemwork.wire.types import (
    ErrorBody,
    LeaseRenewal,
    RegisterRequest,
    RegisterResponse,
    RouteKey,
    Session,
    SessionList,
)

__all__ = [
    "CONTROL_API_PREFIX",
    "PROTOCOL_HEADER",
    "PROTOCOL_VERSION",
    "ROUTE_HEADER",
    "ErrorBody",
    "LeaseRenewal",
    "RegisterRequest",
    "RegisterResponse",
    "RouteKey",
    "Session",
    "SessionList",
    "WireFormatError",
    "check_protocol",
    "converter",
    "decode",
    "encode",
]
