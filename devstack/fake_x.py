"""The one stand-in for the X API v2 subset the X channel uses, for the tests and `make run`.

DM, follow, unfollow and user lookup by username, answered as X answers them (an unknown
username: HTTP 200 with an `errors` array of type resource-not-found and no `data`).
The tests run it with a token it checks and the users they add (`add_user`); the dev stack
(devstack/providers.py) runs it with `stand_in=True`: any bearer token is accepted and every
handle resolves to a stable made-up id (`stand_in_user_id`) except those starting with
`unknown`, which do not exist.
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from devstack.fake_http import CallListener, FakeService, RecordedRequest

X_TOKEN = "test-x-token"


def stand_in_user_id(username: str) -> str:
    """The made-up, stable numeric X user id the dev stand-in gives `username`."""
    digest = hashlib.sha256(username.lower().encode("utf-8")).hexdigest()
    return str(10**17 + int(digest[:15], 16) % (9 * 10**17))


def _problem(status: int, title: str, detail: str) -> JSONResponse:
    return JSONResponse(
        {"title": title, "detail": detail, "type": "about:blank", "status": status},
        status_code=status,
    )


def _not_found(username: str) -> JSONResponse:
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


class FakeX(FakeService):
    """The X API stand-in; `dms`, `following` and `lookups` say what it was asked.

    `token`: the bearer token it accepts (None: any). `users` maps a handle (any case) to
    its numeric id; `lookups` lists every username looked up (scripted failures included).
    """

    def __init__(self, token: str | None = X_TOKEN, *, stand_in: bool = False, on_call: CallListener | None = None):
        self.token = token
        self.stand_in = stand_in
        self.dms: list[dict[str, str]] = []
        self.following: set[tuple[str, str]] = set()
        self.users: dict[str, str] = {}
        self.lookups: list[str] = []
        self._ids = itertools.count(1_000_000_000_000_000_001)
        super().__init__(on_call=on_call)

    @property
    def auth_headers(self) -> dict[str, str]:
        """Headers a client needs to be accepted."""
        return {"Authorization": f"Bearer {self.token}"}

    def add_user(self, username: str, user_id: str) -> None:
        """Make `@username` an existing account with this numeric id."""
        self.users[username.lower()] = user_id

    def user_id(self, username: str) -> str | None:
        """The id `username` resolves to, or None if there is no such account."""
        known = self.users.get(username.lower())
        if known is not None or not self.stand_in or username.lower().startswith("unknown"):
            return known
        return stand_in_user_id(username)

    def routes(self) -> list[Route]:
        return [
            Route("/2/dm_conversations/with/{participant_id}/messages", self._dm, methods=["POST"]),
            Route("/2/users/{user_id}/following", self._follow, methods=["POST"]),
            Route("/2/users/{user_id}/following/{target_id}", self._unfollow, methods=["DELETE"]),
            Route("/2/users/by/username/{username}", self._by_username, methods=["GET"]),
        ]

    async def _gate(self, request: Request) -> tuple[RecordedRequest, Response | None]:
        rec = await self._record(request)
        scripted = await self._scripted()
        if scripted is not None:
            return rec, scripted
        if self.token is not None and rec.headers.get("authorization") != f"Bearer {self.token}":
            return rec, _problem(401, "Unauthorized", "Unauthorized")
        return rec, None

    async def _dm(self, request: Request) -> Response:
        rec, early = await self._gate(request)
        if early is not None:
            return early
        participant = request.path_params["participant_id"]
        body: dict[str, Any] = rec.json if isinstance(rec.json, dict) else {}
        text = body.get("text")
        if not isinstance(text, str) or not text:
            return _problem(400, "Invalid Request", "One or more parameters are invalid: text")
        event_id = str(next(self._ids))
        self.dms.append({"participant_id": participant, "text": text, "dm_event_id": event_id})
        self._heard("x.dm", rec, {"to": participant, **body})
        return JSONResponse(
            {"data": {"dm_conversation_id": f"1-{participant}", "dm_event_id": event_id}},
            status_code=201,
        )

    async def _follow(self, request: Request) -> Response:
        rec, early = await self._gate(request)
        if early is not None:
            return early
        body: dict[str, Any] = rec.json if isinstance(rec.json, dict) else {}
        target = body.get("target_user_id")
        if not isinstance(target, str) or not target.isdigit():
            return _problem(400, "Invalid Request", "target_user_id must be a numeric string")
        self.following.add((request.path_params["user_id"], target))
        self._heard("x.follow", rec, {"source": request.path_params["user_id"], **body})
        return JSONResponse({"data": {"following": True, "pending_follow": False}})

    async def _unfollow(self, request: Request) -> Response:
        rec, early = await self._gate(request)
        if early is not None:
            return early
        source, target = request.path_params["user_id"], request.path_params["target_id"]
        self.following.discard((source, target))
        self._heard("x.unfollow", rec, {"source": source, "target": target})
        return JSONResponse({"data": {"following": False}})

    async def _by_username(self, request: Request) -> Response:
        username = request.path_params["username"]
        with self._lock:
            self.lookups.append(username)
        rec, early = await self._gate(request)
        if early is not None:
            return early
        user_id = self.user_id(username)
        if user_id is None:
            self._heard("x.lookup", rec, {"username": username, "found": False})
            return _not_found(username)
        self._heard("x.lookup", rec, {"username": username, "id": user_id})
        return JSONResponse({"data": {"id": user_id, "name": username.title(), "username": username}})
