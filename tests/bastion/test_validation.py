"""Tests for the checks of dev server response headers."""

from __future__ import annotations

from ephemwork.bastion.validation import invalid_response_header


class TestInvalidResponseHeader:
    def test_latin1_value(self) -> None:
        """A value with a Latin-1 byte is reported with the header and the byte."""
        problem = invalid_response_header([(b"Content-Disposition", b"filename=caf\xe9.txt")])
        assert problem is not None
        assert problem.startswith("'Content-Disposition' with the byte 0xe9")

    def test_utf8_value(self) -> None:
        """A UTF-8 value is accepted."""
        assert invalid_response_header([(b"X-Name", "café ☕".encode())]) is None

    def test_control_byte(self) -> None:
        """A control byte is reported as such."""
        assert (
            invalid_response_header([(b"X-Bad", b"a\x01b")]) == "'X-Bad' with a control character"
        )

    def test_non_ascii_name(self) -> None:
        """A name with a byte above 0x7F is reported."""
        problem = invalid_response_header([(b"X-Caf\xe9", b"1")])
        assert problem == "'X-Café' with a byte above 0x7F in its name"
