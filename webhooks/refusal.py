"""A request refused by a dependency, answered with the response it carries; body limits.

FastAPI's `HTTPException` answers `{"detail": ...}`; our public answers are
`{"error": ...}` JSON (and HTML pages for links people click), so a dependency raises
`Refusal(response)` and the handler `create_app` installs sends that response as is.
"""

from __future__ import annotations

from fastapi import Request, Response
from fastapi.responses import JSONResponse


class Refusal(Exception):
    """Stop handling this request and answer `response`."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


async def answer_refusal(_request: Request, exc: Exception) -> Response:
    """The exception handler for `Refusal`."""
    assert isinstance(exc, Refusal)
    return exc.response


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past `limit` bytes (declared or streamed)."""
    too_large = Refusal(JSONResponse({"error": f"body larger than {limit} bytes"}, status_code=413))
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return body
