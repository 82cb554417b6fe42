"""Schemathesis hooks for the contract test (loaded through SCHEMATHESIS_HOOKS).

One check of our own on top of the built-in ones: every 4xx and 5xx body, on
any operation, is the error envelope, whatever layer produced it.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from pydantic import ValidationError

from backend.errors import ErrorResponse


@schemathesis.check
def error_envelope(
    ctx: schemathesis.CheckContext,
    response: schemathesis.Response,
    case: schemathesis.Case[Any],
) -> bool | None:
    """An error response's body is `{"error": {code, message, request_id, trace_id, details}}`."""
    if response.status_code < 400 or case.method.upper() == "HEAD":
        return None
    try:
        ErrorResponse.model_validate_json(response.content)
    except ValidationError as exc:
        raise AssertionError(
            f"{response.status_code} body is not the error envelope: {response.text[:300]!r}"
        ) from exc
    return None
