"""Allocation of tunnel ports from the configured range.

The allocator itself does no I/O; it asks a predicate whether a port is free, and the
bastion passes `has_no_listener`, which tries to bind the port on loopback.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from ephemwork.errors import OperationError

MIN_PORT = 1
MAX_PORT = 65535


class PortsExhaustedError(OperationError):
    """Every port of the configured range is held by a live session."""

    code = "ports_exhausted"


def validate_port_range(port_range: tuple[int, int]) -> tuple[int, int]:
    """Check an inclusive ``(low, high)`` port range and return it; raise ValueError if invalid."""
    low, high = port_range
    if not (MIN_PORT <= low <= MAX_PORT and MIN_PORT <= high <= MAX_PORT):
        raise ValueError(
            f"port range {low}-{high} is invalid: both ends must be between "
            f"{MIN_PORT} and {MAX_PORT}"
        )
    if low > high:
        raise ValueError(f"port range {low}-{high} is invalid: the low end is above the high end")
    return port_range


def has_no_listener(port: int) -> bool:
    """Return whether *port* can be bound on 127.0.0.1, so nothing listens on it.

    SO_REUSEADDR lets the bind succeed over connections in TIME_WAIT, which hold no
    listener, while a listening socket on the port (or on the wildcard address) still
    makes it fail on Linux.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class PortAllocator:
    """The ports of an inclusive range that live sessions hold.

    Ports outside the range can be reserved too, so that sessions reloaded after the range
    was narrowed keep their port and no other session gets it.
    """

    low: int
    high: int
    _in_use: set[int]
    _is_free: Callable[[int], bool]

    def __init__(
        self, port_range: tuple[int, int], *, is_free: Callable[[int], bool] = lambda _: True
    ) -> None:
        self.low, self.high = validate_port_range(port_range)
        self._in_use = set()
        # A port that no session holds can still be listened on, for example by the
        # forward of a session that was reaped while its SSH connection stayed open.
        self._is_free = is_free

    @property
    def capacity(self) -> int:
        """The number of ports in the range."""
        return self.high - self.low + 1

    @property
    def in_use(self) -> frozenset[int]:
        """The ports currently held, including reserved ones outside the range."""
        return frozenset(self._in_use)

    def contains(self, port: int) -> bool:
        """Return whether *port* lies inside the range."""
        return self.low <= port <= self.high

    def allocate(self, preferred: int | None = None) -> int:
        """Hold and return *preferred* if it is in the range and free, else the lowest free port.

        Raises `PortsExhaustedError` when every port of the range is held.
        """
        candidates = list(range(self.low, self.high + 1))
        if preferred is not None and self.contains(preferred):
            # Moved to the front rather than repeated, so a busy one is counted once.
            candidates.remove(preferred)
            candidates.insert(0, preferred)

        busy = 0
        for port in candidates:
            if port in self._in_use:
                continue
            if not self._is_free(port):
                busy += 1
                continue
            self._in_use.add(port)
            return port

        active = len(self._in_use)
        others = f", and {busy} more held by other listeners (old SSH forwards)" if busy else ""
        raise PortsExhaustedError(
            f"All {self.capacity} tunnel ports ({self.low}-{self.high}) are busy: "
            f"{active} held by {active} active sessions{others}. Stop unused sessions with "
            "`ephemwork down`, or start the bastion with a wider --port-range."
        )

    def reserve(self, port: int) -> None:
        """Hold *port*, which a reloaded session already owns; raise ValueError if it is held."""
        if port in self._in_use:
            raise ValueError(f"port {port} is already held by another session")
        self._in_use.add(port)

    def release(self, port: int) -> None:
        """Free *port*; freeing a port that is not held does nothing."""
        self._in_use.discard(port)
