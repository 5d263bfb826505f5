"""Tests for the route header parser."""

from __future__ import annotations

import pytest

from ephemwork.bastion.routing import (
    MAX_ROUTE_VALUE_BYTES,
    InvalidRouteError,
    parse_route_value,
    route_from_header_values,
)
from ephemwork.wire import RouteKey


class TestParseRouteValue:
    def test_valid(self) -> None:
        """A user and a service separated by a colon parse into a RouteKey."""
        assert parse_route_value("alice:api") == RouteKey("alice", "api")

    def test_surrounding_whitespace(self) -> None:
        """Spaces and tabs around the value are not part of it."""
        assert parse_route_value(" \talice:front-end ") == RouteKey("alice", "front-end")

    def test_missing_colon(self) -> None:
        """A value without a colon names the missing colon."""
        with pytest.raises(InvalidRouteError, match="missing ':'"):
            parse_route_value("alice")

    @pytest.mark.parametrize(("value", "part"), [(":api", "user"), ("alice:", "service")])
    def test_empty_part(self, value: str, part: str) -> None:
        """An empty user or service names the empty part."""
        with pytest.raises(InvalidRouteError, match=f"the {part} part is empty"):
            parse_route_value(value)

    def test_empty_value(self) -> None:
        """An empty value is invalid."""
        with pytest.raises(InvalidRouteError, match="empty"):
            parse_route_value("   ")

    @pytest.mark.parametrize(
        "value", ["Alice:api", "alice:a pi", "alice:api:v2", "al/ice:api", "alice:-api", "é:api"]
    )
    def test_outside_name_rule(self, value: str) -> None:
        """Characters outside the name rule are invalid and the message states the rule."""
        with pytest.raises(InvalidRouteError, match="is not a valid name; use 1 to 63"):
            parse_route_value(value)

    @pytest.mark.parametrize(("character", "name"), [("\r", "CR"), ("\n", "LF"), ("\0", "NUL")])
    def test_control_characters(self, character: str, name: str) -> None:
        """CR, LF and NUL are named and not echoed back."""
        with pytest.raises(InvalidRouteError) as caught:
            parse_route_value(f"alice:api{character}x")
        assert str(caught.value).endswith(f"it contains {name}")

    def test_too_long(self) -> None:
        """A value longer than the byte limit is invalid even if its names were valid."""
        value = "a" * 63 + ":" + "b" * (MAX_ROUTE_VALUE_BYTES - 63)
        with pytest.raises(InvalidRouteError, match="the maximum is 128"):
            parse_route_value(value)

    def test_length_limit_counts_bytes(self) -> None:
        """The limit counts UTF-8 bytes, not characters."""
        with pytest.raises(InvalidRouteError, match="bytes long"):
            parse_route_value("é" * 65)

    def test_reason_is_one_line(self) -> None:
        """Every reason fits on one line."""
        for value in ["alice", ":api", "Alice:api", "x" * 200, "a:b\nc"]:
            with pytest.raises(InvalidRouteError) as caught:
                parse_route_value(value)
            assert "\n" not in str(caught.value)


class TestRouteFromHeaderValues:
    def test_absent(self) -> None:
        """No header values select no route."""
        assert route_from_header_values([]) is None

    def test_single(self) -> None:
        """One value selects its route."""
        assert route_from_header_values(["bob:api"]) == RouteKey("bob", "api")

    def test_identical_duplicates(self) -> None:
        """Repeated identical values select one route."""
        assert route_from_header_values(["bob:api", " bob:api"]) == RouteKey("bob", "api")

    def test_combined_identical(self) -> None:
        """A comma-combined line of identical values selects one route."""
        assert route_from_header_values(["bob:api, bob:api"]) == RouteKey("bob", "api")

    def test_disagreeing(self) -> None:
        """Values naming different routes are invalid and both are named."""
        with pytest.raises(InvalidRouteError, match="disagree: 'alice:api', 'bob:api'"):
            route_from_header_values(["bob:api", "alice:api"])

    def test_combined_disagreeing(self) -> None:
        """A comma-combined line naming different routes is invalid."""
        with pytest.raises(InvalidRouteError, match="disagree"):
            route_from_header_values(["bob:api,bob:web"])

    def test_one_invalid_among_valid(self) -> None:
        """An invalid value makes the whole header invalid."""
        with pytest.raises(InvalidRouteError, match="missing ':'"):
            route_from_header_values(["bob:api", "bob"])
