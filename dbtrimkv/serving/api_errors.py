"""Errors a client gets back, in OpenAI's error schema.

Why: OpenAI clients (and the people reading their exceptions) expect `{"error": {"message", "type",
"param", "code"}}` with the usual status codes: 400 bad request, 401 wrong key, 404 unknown model,
409 session busy, 413 too large, 429 queue full (with Retry-After), 503 shutting down or a batch
failed under a request that cannot be restarted (see stepper.py; retry at once).
"""

from __future__ import annotations

import re

from ..errors import DBTrimKVError

_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")
_PATH = re.compile(r"(?<![\w.:/])/(?:[\w.+-]+/)+[\w.+-]*")


def scrub(text: str) -> str:
    """A message without object reprs (`<_io.BytesIO object at 0x...>`) or absolute server paths."""
    return _PATH.sub("<path>", _REPR.sub("<object>", text))


class APIError(DBTrimKVError):
    status = 400
    type = "invalid_request_error"
    code: str | None = None
    scrubbed = True  # (False: a message that can hold no server detail, only the request's own path and routes)

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        message = scrub(message) if self.scrubbed else message
        super().__init__(message)
        self.message, self.param = message, param
        if code is not None:
            self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(APIError):
    status, code = 400, "invalid_request"


class Unauthorized(APIError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class ModelNotFound(APIError):
    status, code = 404, "model_not_found"


class NotFound(APIError):
    status, code, scrubbed = 404, "not_found", False


class MethodNotAllowed(APIError):
    status, code, scrubbed = 405, "method_not_allowed", False

    def __init__(self, message: str, allow: str | None = None):
        super().__init__(message)
        self.allow = allow

    def headers(self) -> dict[str, str]:
        return {"Allow": self.allow} if self.allow else {}


class Conflict(APIError):
    status, code = 409, "session_busy"


class TooLarge(APIError):
    status, code = 413, "request_too_large"


class QueueFull(APIError):
    status, type, code = 429, "rate_limit_error", "queue_full"

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class Unavailable(APIError):
    status, type, code = 503, "service_unavailable", "shutting_down"


class InternalError(APIError):
    status, type, code = 500, "server_error", "internal_error"


def server_failure(exc: BaseException) -> InternalError:
    """The one 500 for a bug met while handling a request (the log has the traceback), wherever it ran:
    the HTTP layer, or the engine process preparing the request."""
    return InternalError(f"the server failed on this request ({type(exc).__name__})")


class BatchFailed(APIError):
    status, type, code = 503, "service_unavailable", "batch_failed"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "0"}
