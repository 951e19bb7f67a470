"""Errors as the OpenAI API returns them: `{"error": {"message", "type", "param", "code"}}`.

The official `openai` client turns the status into its exception class (400 BadRequestError,
401 AuthenticationError, 404 NotFoundError, 422 UnprocessableEntityError, 429 RateLimitError,
5xx InternalServerError) and reads the message from this body. `x-should-retry` tells the client
whether a retry can succeed (it retries 429 and 5xx on its own when told so)."""
from __future__ import annotations

from typing import Optional

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         422: "invalid_request_error", 429: "rate_limit_error", 500: "internal_server_error",
         503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 retry: Optional[bool] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.retry = status, message, param, code, retry

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)

    def headers(self) -> dict:
        if self.retry is None:
            return {}
        headers = {"x-should-retry": "true" if self.retry else "false"}
        if self.retry:
            headers["retry-after"] = "1"
        return headers


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code if code is not None else status}}


def bad_request(param: str, message: str) -> APIError:
    return APIError(400, message, param=param)
