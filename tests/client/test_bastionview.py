"""Telling the laptop's responses to a probe from those the bastion generates."""

from __future__ import annotations

import json

from multidict import CIMultiDict

from ephemwork.client.bastionview import classify_probe
from ephemwork.client.control import HttpResponse


def _response(status: int, body: bytes) -> HttpResponse:
    return HttpResponse(status, CIMultiDict(), body)


class TestClassifyProbe:
    def test_dev_server_answer(self) -> None:
        """Any response of the dev server, a 404 included, came from the laptop."""
        result = classify_probe(_response(404, b"not found"))

        assert result.from_laptop
        assert result.dev_server_up

    def test_bastion_json_error(self) -> None:
        """The bastion's JSON error shape means the laptop never responded."""
        body = json.dumps(
            {"status": 502, "error": "tunnel_unavailable", "message": "down", "request_id": "1"}
        ).encode()

        result = classify_probe(_response(502, body))

        assert not result.from_laptop
        assert result.detail == "the bastion answered 502: down"

    def test_old_bastion_text(self) -> None:
        """The older bastion's plain-text 502 is recognized too."""
        result = classify_probe(_response(502, b"the laptop's tunnel for 'a:b' is down\n"))

        assert not result.from_laptop

    def test_dev_server_down(self) -> None:
        """The laptop's own 502 for a stopped dev server came from the laptop."""
        body = b"the dev server on the laptop is not running (it exited with code 3)\n"

        result = classify_probe(_response(502, body))

        assert result.from_laptop
        assert not result.dev_server_up
