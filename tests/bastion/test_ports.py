"""Tests for tunnel port allocation."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from ephemwork.bastion.ports import (
    PortAllocator,
    PortsExhaustedError,
    has_no_listener,
    validate_port_range,
)


@contextmanager
def listener_below_free_port() -> Iterator[int]:
    """Listen on a loopback port P whose neighbour P + 1 has no listener; yield P.

    Other processes on the machine may listen next to a random port, so a few ports are tried.
    """
    for _ in range(20):
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            port: int = listener.getsockname()[1]
            if port < 65535 and has_no_listener(port + 1):
                yield port
                return
    raise AssertionError("no loopback port with a free neighbour in 20 tries")


class TestValidatePortRange:
    @pytest.mark.parametrize("port_range", [(0, 10), (10, 65536), (20, 10)])
    def test_invalid(self, port_range: tuple[int, int]) -> None:
        """Ranges outside 1-65535 or reversed raise ValueError naming the range."""
        with pytest.raises(ValueError, match=f"port range {port_range[0]}-{port_range[1]}"):
            validate_port_range(port_range)

    def test_single_port(self) -> None:
        """A range of one port is valid."""
        assert validate_port_range((5, 5)) == (5, 5)


class TestPortAllocator:
    def test_lowest_first(self) -> None:
        """Without a preference the lowest free port is allocated."""
        ports = PortAllocator((100, 102))
        assert [ports.allocate(), ports.allocate()] == [100, 101]

    def test_preferred_free(self) -> None:
        """A free preferred port inside the range is allocated."""
        assert PortAllocator((100, 110)).allocate(107) == 107

    def test_preferred_taken(self) -> None:
        """A preferred port already held falls back to the lowest free one."""
        ports = PortAllocator((100, 110))
        ports.allocate(100)
        assert ports.allocate(100) == 101

    def test_preferred_outside_range(self) -> None:
        """A preferred port outside the range is ignored."""
        assert PortAllocator((100, 110)).allocate(5000) == 100

    def test_never_twice(self) -> None:
        """Every port of the range is handed out exactly once."""
        ports = PortAllocator((100, 199))
        allocated = [ports.allocate(150) for _ in range(100)]
        assert sorted(allocated) == list(range(100, 200))

    def test_release_reuses(self) -> None:
        """A released port can be allocated again."""
        ports = PortAllocator((100, 101))
        ports.allocate()
        ports.allocate()
        ports.release(100)
        assert ports.allocate() == 100

    def test_reserve_outside_range(self) -> None:
        """A reserved port outside the range is held but not counted in the range."""
        ports = PortAllocator((100, 100))
        ports.reserve(5000)
        assert ports.allocate() == 100

    def test_reserve_twice(self) -> None:
        """Reserving a held port raises ValueError."""
        ports = PortAllocator((100, 101))
        ports.reserve(100)
        with pytest.raises(ValueError, match="port 100"):
            ports.reserve(100)

    def test_exhausted_message(self) -> None:
        """The exhaustion message states how many sessions are active and how to raise the limit."""
        ports = PortAllocator((100, 101))
        ports.allocate()
        ports.allocate()
        with pytest.raises(PortsExhaustedError) as caught:
            ports.allocate()
        message = str(caught.value)
        assert "2 active sessions" in message
        assert "--port-range" in message

    def test_exhausted_code(self) -> None:
        """The exhaustion error carries the control API code."""
        assert PortsExhaustedError.code == "ports_exhausted"


class TestListenerCheck:
    def test_listened_port_skipped(self) -> None:
        """A port that something listens on is not handed out."""
        with listener_below_free_port() as port:
            allocator = PortAllocator((port, port + 1), is_free=has_no_listener)
            assert allocator.allocate(preferred=port) == port + 1

    def test_busy_preferred_counted_once(self) -> None:
        """A busy preferred port counts once among the other listeners."""
        with listener_below_free_port() as port:
            allocator = PortAllocator((port, port), is_free=has_no_listener)
            with pytest.raises(PortsExhaustedError) as caught:
                allocator.allocate(preferred=port)
        assert "1 more held by other listeners" in str(caught.value)

    def test_exhausted_by_listeners(self) -> None:
        """Exhaustion counts active sessions and other listeners, and names --port-range."""
        allocator = PortAllocator((20000, 20001), is_free=lambda port: port != 20001)
        allocator.allocate()
        with pytest.raises(PortsExhaustedError) as caught:
            allocator.allocate()
        assert "1 active sessions" in str(caught.value)
        assert "1 more held by other listeners" in str(caught.value)
        assert "--port-range" in str(caught.value)
