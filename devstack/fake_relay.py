"""The one stand-in for a LinkedIn/XMTP relay (docs/relay.md), for the tests and `make run`.

It checks the bearer token and the HMAC signature with its own code (not the client's),
and deduplicates by idempotency key, answering 409 on a repeat, as docs/relay.md asks of a
real relay. The dev stack runs it with `token=None, signing_key=None` (accept any caller).
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from devstack.fake_http import CallListener, FakeService, RecordedRequest

RELAY_TOKEN = "test-relay-token"
RELAY_SIGNING_KEY = "test-relay-signing-key"
RELAY_WINDOW_SECONDS = 300


class FakeRelay(FakeService):
    """A relay following docs/relay.md: signed requests, dedup by idempotency key."""

    CHANNEL_ACTIONS = {
        "linkedin": {"SEND_CONNECTION_REQUEST", "SEND_LINKEDIN_DM"},
        "xmtp": {"SEND_XMTP_DM"},
    }

    def __init__(
        self,
        token: str | None = RELAY_TOKEN,
        *,
        signing_key: str | None = RELAY_SIGNING_KEY,
        reply_status: str = "queued",
        on_call: CallListener | None = None,
    ) -> None:
        self.token = token
        self.signing_key = signing_key
        self.reply_status = reply_status
        self.actions: list[dict[str, Any]] = []
        self.done: dict[str, str] = {}
        self.rejected_signatures = 0
        self.invalid_recipients: set[str] = set()
        self._ids = itertools.count(1)
        super().__init__(on_call=on_call)

    def routes(self) -> list[Route]:
        return [Route("/v1/actions", self._action, methods=["POST"])]

    def _signature_ok(self, rec: RecordedRequest) -> bool:
        if self.signing_key is None:
            return True
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
        if self.token is not None and rec.headers.get("authorization") != f"Bearer {self.token}":
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
        self._heard(f"relay.{body['channel']}", rec, body)
        return JSONResponse({"id": action_id, "status": self.reply_status}, status_code=202)
