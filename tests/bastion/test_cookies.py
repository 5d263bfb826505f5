"""Tests for the route cookie helpers."""

from __future__ import annotations

import pytest

from ephemwork.bastion.cookies import same_origin_location


class TestSameOriginLocation:
    @pytest.mark.parametrize(
        ("raw_path", "location"),
        [
            ("/page", "/page"),
            ("//evil.example/x", "/evil.example/x"),
            ("/\\evil.example", "/evil.example"),
            ("/\t/evil.example", "/evil.example"),
            ("/", "/"),
        ],
    )
    def test_path(self, raw_path: str, location: str) -> None:
        """Leading slashes, backslashes and tabs collapse into one slash."""
        assert same_origin_location(raw_path, "") == location

    def test_query_kept(self) -> None:
        """The remaining query follows the path."""
        assert same_origin_location("//a/b", "x=1&y=%20") == "/a/b?x=1&y=%20"
