"""Real local HTTP servers that speak the X API v2 subset and the relay protocol.

Why real servers and not mocked transports: the channels' error classification depends
on what actually happens on the wire (status codes, headers, a request that is written
but never answered), so tests run the real `httpx` client against a Starlette app served
by uvicorn on 127.0.0.1 in a background thread. Every request is recorded; responses can
be scripted (`fail_next`, `hang_next`). The relay fake checks the bearer token and the
HMAC signature with its own code (not the client's), and deduplicates by idempotency
key, answering 409 on a repeat, as docs/relay.md asks of a real relay.

Use in a test module::

    from tests.fakes import relay_server, x_server  # noqa: F401

    async def test_dm(x_server: FakeX) -> None:
        client = httpx.AsyncClient(base_url=x_server.base_url, headers=x_server.auth_headers)
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

X_TOKEN = "test-x-token"
RELAY_TOKEN = "test-relay-token"
RELAY_SIGNING_KEY = "test-relay-signing-key"
RELAY_WINDOW_SECONDS = 300


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
                raise RuntimeError(f"the test HTTP server on port {port} failed to start")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the test HTTP server on port {port} did not start")
            time.sleep(0.002)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@dataclass
class RecordedRequest:
    """One request as the fake server saw it."""

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
    """Recording and scripting shared by the fakes; subclasses add the routes."""

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.base_url = ""
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


def _problem(status: int, title: str, detail: str) -> JSONResponse:
    return JSONResponse(
        {"title": title, "detail": detail, "type": "about:blank", "status": status},
        status_code=status,
    )


class FakeX(FakeService):
    """The X API v2 subset the X channel uses: DM, follow, unfollow, user lookup by username.

    `users` maps a handle (any case) to its numeric id; `lookups` lists every username
    looked up (scripted failures included). An unknown username answers as X does: HTTP
    200 with an `errors` array of type resource-not-found and no `data`.
    """

    def __init__(self, token: str = X_TOKEN) -> None:
        self.token = token
        self.dms: list[dict[str, str]] = []
        self.following: set[tuple[str, str]] = set()
        self.users: dict[str, str] = {}
        self.lookups: list[str] = []
        self._ids = itertools.count(1_000_000_000_000_000_001)
        super().__init__()

    @property
    def auth_headers(self) -> dict[str, str]:
        """Headers a client needs to be accepted."""
        return {"Authorization": f"Bearer {self.token}"}

    def add_user(self, username: str, user_id: str) -> None:
        """Make `@username` an existing account with this numeric id."""
        self.users[username.lower()] = user_id

    def routes(self) -> list[Route]:
        return [
            Route(
                "/2/dm_conversations/with/{participant_id}/messages",
                self._dm,
                methods=["POST"],
            ),
            Route("/2/users/{user_id}/following", self._follow, methods=["POST"]),
            Route("/2/users/{user_id}/following/{target_id}", self._unfollow, methods=["DELETE"]),
            Route("/2/users/by/username/{username}", self._by_username, methods=["GET"]),
        ]

    async def _gate(self, request: Request) -> tuple[RecordedRequest, Response | None]:
        rec = await self._record(request)
        scripted = await self._scripted()
        if scripted is not None:
            return rec, scripted
        if rec.headers.get("authorization") != f"Bearer {self.token}":
            return rec, _problem(401, "Unauthorized", "Unauthorized")
        return rec, None

    async def _dm(self, request: Request) -> Response:
        rec, early = await self._gate(request)
        if early is not None:
            return early
        participant = request.path_params["participant_id"]
        text = rec.json.get("text") if isinstance(rec.json, dict) else None
        if not isinstance(text, str) or not text:
            return _problem(400, "Invalid Request", "One or more parameters are invalid: text")
        event_id = str(next(self._ids))
        self.dms.append({"participant_id": participant, "text": text, "dm_event_id": event_id})
        return JSONResponse(
            {"data": {"dm_conversation_id": f"1-{participant}", "dm_event_id": event_id}},
            status_code=201,
        )

    async def _follow(self, request: Request) -> Response:
        rec, early = await self._gate(request)
        if early is not None:
            return early
        target = rec.json.get("target_user_id") if isinstance(rec.json, dict) else None
        if not isinstance(target, str) or not target.isdigit():
            return _problem(400, "Invalid Request", "target_user_id must be a numeric string")
        self.following.add((request.path_params["user_id"], target))
        return JSONResponse({"data": {"following": True, "pending_follow": False}})

    async def _unfollow(self, request: Request) -> Response:
        _rec, early = await self._gate(request)
        if early is not None:
            return early
        self.following.discard((request.path_params["user_id"], request.path_params["target_id"]))
        return JSONResponse({"data": {"following": False}})

    async def _by_username(self, request: Request) -> Response:
        username = request.path_params["username"]
        with self._lock:
            self.lookups.append(username)
        _rec, early = await self._gate(request)
        if early is not None:
            return early
        user_id = self.users.get(username.lower())
        if user_id is None:
            return JSONResponse(
                {
                    "errors": [
                        {
                            "value": username,
                            "detail": f"Could not find user with username: [{username}].",
                            "title": "Not Found Error",
                            "resource_type": "user",
                            "parameter": "username",
                            "resource_id": username,
                            "type": "https://api.twitter.com/2/problems/resource-not-found",
                        }
                    ]
                }
            )
        return JSONResponse({"data": {"id": user_id, "name": username.title(), "username": username}})


class FakeRelay(FakeService):
    """A relay following docs/relay.md: signed requests, dedup by idempotency key."""

    CHANNEL_ACTIONS = {
        "linkedin": {"SEND_CONNECTION_REQUEST", "SEND_LINKEDIN_DM"},
        "xmtp": {"SEND_XMTP_DM"},
    }

    def __init__(
        self, token: str = RELAY_TOKEN, *, signing_key: str = RELAY_SIGNING_KEY, reply_status: str = "queued"
    ) -> None:
        self.token = token
        self.signing_key = signing_key
        self.reply_status = reply_status
        self.actions: list[dict[str, Any]] = []
        self.done: dict[str, str] = {}
        self.rejected_signatures = 0
        self.invalid_recipients: set[str] = set()
        self._ids = itertools.count(1)
        super().__init__()

    def routes(self) -> list[Route]:
        return [Route("/v1/actions", self._action, methods=["POST"])]

    def _signature_ok(self, rec: RecordedRequest) -> bool:
        ts = rec.headers.get("x-relay-timestamp", "")
        sig = rec.headers.get("x-relay-signature", "")
        if not ts.isdigit() or abs(time.time() - int(ts)) > RELAY_WINDOW_SECONDS:
            return False
        expected = hmac.new(self.signing_key.encode(), ts.encode() + b"." + rec.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(sig, f"v1={expected}")

    async def _action(self, request: Request) -> Response:
        rec = await self._record(request)
        scripted = await self._scripted()
        if scripted is not None:
            return scripted
        if rec.headers.get("authorization") != f"Bearer {self.token}":
            return JSONResponse({"error": "bad bearer token"}, status_code=401)
        if not self._signature_ok(rec):
            self.rejected_signatures += 1
            return JSONResponse({"error": "bad signature or timestamp"}, status_code=401)
        body = rec.json
        if not isinstance(body, dict):
            return JSONResponse({"error": "body must be a JSON object"}, status_code=400)
        for name in ("idempotency_key", "channel", "action", "sender", "to"):
            if not isinstance(body.get(name), str) or not body[name]:
                return JSONResponse({"error": f"missing field {name}"}, status_code=400)
        key = body["idempotency_key"]
        if rec.headers.get("idempotency-key") != key:
            return JSONResponse({"error": "Idempotency-Key header differs from idempotency_key"}, status_code=400)
        if body["action"] not in self.CHANNEL_ACTIONS.get(body["channel"], set()):
            return JSONResponse(
                {"error": f"unsupported action {body['channel']}/{body['action']}"},
                status_code=422,
            )
        if body["to"] in self.invalid_recipients:
            return JSONResponse(
                {"error": f"no such profile {body['to']}", "code": "invalid_recipient"},
                status_code=422,
            )
        if key in self.done:
            return JSONResponse(
                {"id": self.done[key], "status": "sent", "error": "duplicate idempotency_key"},
                status_code=409,
            )
        action_id = f"rly_{next(self._ids)}"
        self.done[key] = action_id
        self.actions.append({**body, "id": action_id})
        return JSONResponse({"id": action_id, "status": self.reply_status}, status_code=202)


@pytest.fixture
def x_server() -> Iterator[FakeX]:
    """A running fake X API (token `X_TOKEN`)."""
    fake = FakeX()
    with fake.running():
        yield fake


@pytest.fixture
def relay_server() -> Iterator[FakeRelay]:
    """A running fake relay (token `RELAY_TOKEN`)."""
    fake = FakeRelay()
    with fake.running():
        yield fake
