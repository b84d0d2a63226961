"""Errors as OpenAI's API returns them: an HTTP status and {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from typing import Any

# OpenAI's error types by status (what its clients map to their exception classes)
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error",
               503: "service_unavailable"}


class ApiError(Exception):
    """A request the server refuses: status, a message naming the field and what would be valid, the field as
    `param`, and a short machine-readable `code`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}
