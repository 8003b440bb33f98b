"""One exception tree for every client-visible failure; `error_middleware` maps it to HTTP in one place."""
from __future__ import annotations

from typing import Any

__all__ = [
    "ApiError", "BadRequest", "Unauthorized", "Forbidden", "NotFound", "Conflict", "PayloadTooLarge",
    "Unprocessable", "TooManyRequests", "ServiceUnavailable", "PaymentRequired",
]


class ApiError(Exception):
    """A failure the client caused or can act on; rendered as {"error": code, "detail": ...}."""

    status = 500
    code = "internal_error"

    def __init__(self, code: str | None = None, detail: Any = None, *, headers: dict[str, str] | None = None) -> None:
        self.code = code or self.code
        self.detail = detail
        self.headers = headers or {}
        super().__init__(f"{self.code}: {detail}")

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "detail": self.detail}


class BadRequest(ApiError):
    status, code = 400, "bad_request"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class NotFound(ApiError):
    status, code = 404, "not_found"


class Conflict(ApiError):
    status, code = 409, "conflict"


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class Unprocessable(ApiError):
    status, code = 422, "validation_error"


class TooManyRequests(ApiError):
    status, code = 429, "too_many_requests"


class ServiceUnavailable(ApiError):
    status, code = 503, "service_unavailable"


class PaymentRequired(ApiError):
    """Paying (again, or differently) can help: rendered as a 402 with a fresh invoice by the paywall."""

    status, code = 402, "payment_required"
