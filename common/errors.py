"""The one error type every surface turns into the PROTOCOL §7 error body.

Raising ``ApiError`` anywhere below a REST handler yields
``{"error": {"code", "message", "details"}}`` with the right status; the
socket handlers turn the same codes into ``error`` frames.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error with a public code, an HTTP status and optional details."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            error["details"] = self.details
        return {"error": error}


def validation_error(field: str, message: str) -> ApiError:
    return ApiError(422, "VALIDATION_ERROR", message, {"field": field})


class BackendUnavailable(Exception):
    """A required backend (``redis``, ``postgres``) cannot be reached right now."""

    def __init__(self, backend: str, message: str) -> None:
        super().__init__(message)
        self.backend = backend
