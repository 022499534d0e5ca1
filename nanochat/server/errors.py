"""
Errors in OpenAI's shape, so OpenAI clients raise their usual exceptions:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}

Every route raises APIError; app.py turns it into that body with its status (and headers, e.g.
Retry-After on a 503).
"""
from fastapi.responses import JSONResponse

TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
         404: "invalid_request_error", 405: "invalid_request_error", 409: "invalid_request_error",
         413: "invalid_request_error", 415: "invalid_request_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """A request that gets an error response: status, one-line message, and OpenAI's param/code fields."""

    def __init__(self, message, status=400, param=None, code=None, headers=None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code
        self.headers = headers or {}

    def body(self):
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self):
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def not_found(what, code):
    return APIError(what, 404, code=code)


def busy(message, retry_after=1):
    """503 with Retry-After: the client (the openai package does this itself) waits and tries again."""
    return APIError(message, 503, code="server_busy", headers={"Retry-After": str(retry_after)})
