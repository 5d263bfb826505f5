"""Tests of finding the process that listens on a port."""

from __future__ import annotations

import os
import socket

from ephemwork.client.portowner import find_port_owner, port_accepts_connections


class TestFindPortOwner:
    def test_own_listener(self) -> None:
        """A socket this test listens on is found with this process's pid."""
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            port = listener.getsockname()[1]

            owner = find_port_owner(port)

            assert owner is not None
            assert owner.pid == os.getpid()
            assert port_accepts_connections(port)

    def test_free_port(self) -> None:
        """A port nobody listens on has no owner."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]

        assert find_port_owner(port) is None
