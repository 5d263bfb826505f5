"""Allocation of tunnel ports from the configured range, with no I/O."""

from __future__ import annotations

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


class PortAllocator:
    """The ports of an inclusive range that live sessions hold.

    Ports outside the range can be reserved too, so that sessions reloaded after the range
    was narrowed keep their port and no other session gets it.
    """

    low: int
    high: int
    _in_use: set[int]

    def __init__(self, port_range: tuple[int, int]) -> None:
        self.low, self.high = validate_port_range(port_range)
        self._in_use = set()

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
        if preferred is not None and self.contains(preferred) and preferred not in self._in_use:
            self._in_use.add(preferred)
            return preferred

        for port in range(self.low, self.high + 1):
            if port not in self._in_use:
                self._in_use.add(port)
                return port

        active = len(self._in_use)
        raise PortsExhaustedError(
            f"All {self.capacity} tunnel ports ({self.low}-{self.high}) are in use by "
            f"{active} active sessions. Stop unused sessions with `ephemwork down`, or start "
            "the bastion with a wider --port-range."
        )

    def reserve(self, port: int) -> None:
        """Hold *port*, which a reloaded session already owns; raise ValueError if it is held."""
        if port in self._in_use:
            raise ValueError(f"port {port} is already held by another session")
        self._in_use.add(port)

    def release(self, port: int) -> None:
        """Free *port*; freeing a port that is not held does nothing."""
        self._in_use.discard(port)
