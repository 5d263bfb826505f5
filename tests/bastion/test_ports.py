"""Tests for tunnel port allocation."""

from __future__ import annotations

import pytest

from ephemwork.bastion.ports import PortAllocator, PortsExhaustedError, validate_port_range


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
