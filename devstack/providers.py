"""Local stand-ins for the X API and the LinkedIn/XMTP relay, for the embedded stack.

`make run` serves this app so that the demo's X and relay steps hit real HTTP servers
on loopback (like the SMTP catcher for email). It is the same stand-in the tests use
(devstack/fake_x.py, devstack/fake_relay.py), accepting any caller; every call is appended
as one JSON line to `.dev/providers/calls.jsonl`, which is what a developer reads to see them.
Run: `uvicorn devstack.providers:app --port 8081` (X at /2/..., relay at /v1/actions).

The X user lookup (`GET /2/users/by/username/{username}`) answers every handle with a
stable made-up numeric id (derived from the lower-cased handle), except handles that
start with `unknown`, which answer as X does for a missing account (200 with `errors`).
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from starlette.applications import Starlette

from devstack.fake_relay import FakeRelay
from devstack.fake_x import FakeX, stand_in_user_id

__all__ = ["LOG", "app", "stand_in_user_id"]

LOG = Path(os.environ.get("PROVIDERS_LOG", ".dev/providers/calls.jsonl"))


def _log(kind: str, method: str, path: str, body: dict[str, Any]) -> None:
    """Append one call to `LOG` (read at call time, so it can be pointed elsewhere)."""
    LOG.parent.mkdir(parents=True, exist_ok=True)
    line = {"at": datetime.now(UTC).isoformat(), "kind": kind, "method": method, "path": path, "body": body}
    with LOG.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(line) + "\n")


x = FakeX(token=None, stand_in=True, on_call=_log)
relay = FakeRelay(token=None, signing_key=None, reply_status="sent", on_call=_log)
app = Starlette(routes=[*x.routes(), *relay.routes()])
