"""Local stand-ins for the X API and the LinkedIn/XMTP relay, for the embedded stack.

`make run` serves this app so that the demo's X and relay steps hit real HTTP servers
on loopback (like the SMTP catcher for email). Every call is appended as one JSON line
to `.dev/providers/calls.jsonl`, which is what a developer reads to see them.
Run: `uvicorn devstack.providers:app --port 8081` (X at /2/..., relay at /v1/actions).

The X user lookup (`GET /2/users/by/username/{username}`) answers every handle with a
stable made-up numeric id (derived from the lower-cased handle), except handles that
start with `unknown`, which answer as X does for a missing account (200 with `errors`).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

LOG = Path(os.environ.get("PROVIDERS_LOG", ".dev/providers/calls.jsonl"))
app = FastAPI(title="Sequencer local providers (X API + relay)")
_seen: dict[str, str] = {}


def _record(kind: str, request: Request, body: dict[str, Any]) -> None:
    LOG.parent.mkdir(parents=True, exist_ok=True)
    line = {
        "at": datetime.now(UTC).isoformat(),
        "kind": kind,
        "method": request.method,
        "path": request.url.path,
        "body": body,
    }
    with LOG.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(line) + "\n")


async def _json(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        data = json.loads(raw) if raw else {}
    except ValueError:
        data = {"raw": raw.decode("utf-8", "replace")}
    return data if isinstance(data, dict) else {"value": data}


@app.post("/2/dm_conversations/with/{participant_id}/messages")
async def x_dm(participant_id: str, request: Request) -> JSONResponse:
    """X API v2: send a DM to a participant."""
    body = await _json(request)
    _record("x.dm", request, {"to": participant_id, **body})
    return JSONResponse(
        {"data": {"dm_conversation_id": f"c-{participant_id}", "dm_event_id": uuid.uuid4().hex}},
        status_code=201,
    )


@app.post("/2/users/{source_id}/following")
async def x_follow(source_id: str, request: Request) -> JSONResponse:
    """X API v2: follow a user."""
    body = await _json(request)
    _record("x.follow", request, {"source": source_id, **body})
    return JSONResponse({"data": {"following": True, "pending_follow": False}})


@app.delete("/2/users/{source_id}/following/{target_id}")
async def x_unfollow(source_id: str, target_id: str, request: Request) -> JSONResponse:
    """X API v2: unfollow a user."""
    _record("x.unfollow", request, {"source": source_id, "target": target_id})
    return JSONResponse({"data": {"following": False}})


def stand_in_user_id(username: str) -> str:
    """The made-up, stable numeric X user id the stand-in gives `username`."""
    digest = hashlib.sha256(username.lower().encode("utf-8")).hexdigest()
    return str(10**17 + int(digest[:15], 16) % (9 * 10**17))


@app.get("/2/users/by/username/{username}")
async def x_user_by_username(username: str, request: Request) -> JSONResponse:
    """X API v2: look a user up by handle."""
    if username.lower().startswith("unknown"):
        _record("x.lookup", request, {"username": username, "found": False})
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
    user_id = stand_in_user_id(username)
    _record("x.lookup", request, {"username": username, "id": user_id})
    return JSONResponse({"data": {"id": user_id, "name": username, "username": username}})


@app.post("/v1/actions")
async def relay(request: Request) -> JSONResponse:
    """The relay protocol (docs/relay.md): idempotent per Idempotency-Key."""
    body = await _json(request)
    key = request.headers.get("idempotency-key") or str(body.get("idempotency_key", ""))
    if key in _seen:
        return JSONResponse({"id": _seen[key], "status": "sent"}, status_code=409)
    _seen[key] = uuid.uuid4().hex
    _record(f"relay.{body.get('channel', '?')}", request, body)
    return JSONResponse({"id": _seen[key], "status": "sent"}, status_code=201)
