"""Tests for the control API codec and protocol check."""

from __future__ import annotations

import pytest

from ephemwork.wire import (
    PROTOCOL_HEADER,
    PROTOCOL_VERSION,
    ErrorBody,
    RegisterRequest,
    RegisterResponse,
    Session,
    WireFormatError,
    check_protocol,
    decode,
    encode,
)


def make_session() -> Session:
    return Session(
        session_id="s1",
        user="alice",
        service="api",
        port=20001,
        client="laptop pid 42",
        registered_at=1000.0,
        lease_expires_at=1060.0,
    )


class TestCodec:
    def test_round_trip(self) -> None:
        """A message survives encode and decode unchanged."""
        response = RegisterResponse(session=make_session(), lease_ttl=60.0)

        assert decode(encode(response), RegisterResponse) == response

    def test_optional_fields_default(self) -> None:
        """A register request without optional fields gets their defaults."""
        request = decode(b'{"user":"a","service":"b","client":"c"}', RegisterRequest)

        assert request.preferred_port is None
        assert request.takeover is False

    def test_unknown_key_rejected(self) -> None:
        """A key one side does not know is an error, not silently dropped."""
        with pytest.raises(WireFormatError) as caught:
            decode(b'{"code":"x","message":"m","hint":"h"}', ErrorBody)

        assert "extra fields found (hint)" in str(caught.value)

    def test_wrong_type_names_field(self) -> None:
        """A field of the wrong type is named with its path."""
        with pytest.raises(WireFormatError) as caught:
            decode(b'{"user":"a","service":"b","client":"c","preferred_port":"x"}', RegisterRequest)

        assert "$.preferred_port" in str(caught.value)

    def test_invalid_json(self) -> None:
        """Bytes that are not JSON give a WireFormatError."""
        with pytest.raises(WireFormatError) as caught:
            decode(b"<html>", ErrorBody)

        assert str(caught.value).startswith("invalid JSON")


class TestCheckProtocol:
    def test_same_version_passes(self) -> None:
        """The current version is accepted."""
        assert check_protocol(str(PROTOCOL_VERSION), peer="bastion") is None

    def test_missing_header(self) -> None:
        """A peer without the header is told to upgrade."""
        problem = check_protocol(None, peer="bastion")

        assert problem is not None
        assert PROTOCOL_HEADER in problem
        assert "Upgrade ephemwork on the bastion" in problem

    def test_other_version(self) -> None:
        """A different version names both versions."""
        problem = check_protocol("99", peer="laptop")

        assert problem == (
            f"Protocol version mismatch: the laptop speaks version '99', this side speaks "
            f"{PROTOCOL_VERSION}. Install the same ephemwork release on the laptop and the bastion."
        )
