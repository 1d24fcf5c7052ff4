"""Serving and scripting the local HTTP stand-ins (the X API, the relay) in a thread.

Why real servers and not mocked transports: the channels' error classification depends
on what actually happens on the wire (status codes, headers, a request that is written
but never answered), so the tests and `make run` run the real `httpx` clients against a
Starlette app served by uvicorn on 127.0.0.1. `FakeService` records every request and lets
a test script the next answers (`fail_next`, `hang_next`); `on_call` hears what each route
did (the dev stack appends it to `.dev/providers/calls.jsonl`).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

#: (kind, method, path, body) of one call a stand-in served, e.g. ("x.dm", "POST", "/2/...", {...}).
CallListener = Callable[[str, str, str, dict[str, Any]], None]


@contextmanager
def run_app(app: Any, *, startup_timeout: float = 10.0) -> Iterator[str]:
    """Serve an ASGI app on 127.0.0.1 (a free port) in a thread; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False, timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    try:
        while not server.started:  # readiness poll, not a wait for a timer
            if not thread.is_alive():
                raise RuntimeError(f"the local HTTP server on port {port} failed to start")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the local HTTP server on port {port} did not start")
            time.sleep(0.002)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@dataclass
class RecordedRequest:
    """One request as the stand-in saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any


@dataclass
class _Scripted:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    hang: bool = False


class FakeService:
    """Recording and scripting shared by the stand-ins; subclasses add the routes."""

    def __init__(self, *, on_call: CallListener | None = None) -> None:
        self.requests: list[RecordedRequest] = []
        self.base_url = ""
        self.on_call = on_call
        self._script: deque[_Scripted] = deque()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._release: asyncio.Event | None = None
        self._released = False
        self.app = Starlette(routes=self.routes())

    def routes(self) -> list[Route]:
        """The app's routes."""
        raise NotImplementedError

    # ---- scripting (called from the test's thread)
    def fail_next(
        self,
        status: int,
        headers: dict[str, str] | None = None,
        body: Any = None,
        *,
        times: int = 1,
    ) -> None:
        """Answer the next `times` requests with this status, headers and body (JSON/str)."""
        with self._lock:
            for _ in range(times):
                self._script.append(_Scripted(status, dict(headers or {}), body))

    def hang_next(self, *, times: int = 1) -> None:
        """Read the next `times` requests but never answer them (until `release()`)."""
        with self._lock:
            for _ in range(times):
                self._script.append(_Scripted(hang=True))

    def release(self) -> None:
        """Let hanging requests finish (they then answer 429: throttled, so surely not performed)."""
        self._released = True
        loop, event = self._loop, self._release
        if loop is not None and event is not None and not loop.is_closed():
            loop.call_soon_threadsafe(event.set)

    @contextmanager
    def running(self) -> Iterator[FakeService]:
        """Serve the app; `base_url` is set while inside."""
        with run_app(self.app) as url:
            self.base_url = url
            try:
                yield self
            finally:
                self.release()

    # ---- used by the handlers (server thread)
    def _heard(self, kind: str, rec: RecordedRequest, body: dict[str, Any]) -> None:
        if self.on_call is not None:
            self.on_call(kind, rec.method, rec.path, body)

    async def _record(self, request: Request) -> RecordedRequest:
        body = await request.body()
        try:
            parsed: Any = json.loads(body) if body else None
        except ValueError:
            parsed = None
        rec = RecordedRequest(
            method=request.method,
            path=request.url.path,
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
            json=parsed,
        )
        with self._lock:
            self.requests.append(rec)
        return rec

    async def _scripted(self) -> Response | None:
        with self._lock:
            step = self._script.popleft() if self._script else None
        if step is None:
            return None
        if step.hang:
            if self._release is None:
                self._loop = asyncio.get_running_loop()
                self._release = asyncio.Event()
            if not self._released:
                await self._release.wait()
            return JSONResponse({"error": "released"}, status_code=429)
        if isinstance(step.body, str | bytes):
            return Response(step.body, status_code=step.status, headers=step.headers)
        return JSONResponse(step.body, status_code=step.status, headers=step.headers)
