"""The one cattrs converter for control API messages, and JSON encoding around it."""

from __future__ import annotations

import json
from typing import TypeVar

import cattrs

T = TypeVar("T")

# Unknown keys are an error, so a field renamed on one side is caught instead of ignored.
converter = cattrs.Converter(forbid_extra_keys=True)


class WireFormatError(ValueError):
    """A control API body is not valid JSON or does not match the expected message."""


def encode(message: object) -> bytes:
    """Encode an attrs message as compact UTF-8 JSON."""
    return json.dumps(converter.unstructure(message), separators=(",", ":")).encode()


def decode(data: bytes | str, message_type: type[T]) -> T:
    """Decode JSON *data* into *message_type*, or raise `WireFormatError` saying what is wrong."""
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireFormatError(f"invalid JSON: {exc}") from exc

    try:
        return converter.structure(raw, message_type)
    except (cattrs.BaseValidationError, TypeError, ValueError) as exc:
        details = "; ".join(_describe_validation_error(exc))
        raise WireFormatError(f"invalid {message_type.__name__}: {details}") from exc


def _describe_validation_error(exc: Exception) -> list[str]:
    if isinstance(exc, cattrs.BaseValidationError):
        return cattrs.transform_error(exc)
    return [str(exc)]
