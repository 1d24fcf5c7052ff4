"""The webhook/API app: inbound events, unsubscribe, open tracking, health.

`uvicorn webhooks.app:app` builds its dependencies (engine, Temporal client,
classifier) at startup from settings; tests call `create_app(...)` with their own.
Every inbound request is authenticated before its body is even parsed.
"""

from __future__ import annotations

import asyncio
import html
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import ValidationError
from sqlalchemy import select, text
from temporalio.client import Client

from db.events import append_event
from db.session import SessionFactory, make_engine, make_session_factory
from db.tables import Delivery, Enrollment, SequenceVersion
from models.activities import EnrollmentRef
from models.enrollment import SequenceRef
from services.classify import get_classifier
from services.inbound_pipeline import CHANNELS, InboundPipeline
from services.sender_breaker import paused_senders
from services.tokens import TokenError, read_token
from settings import Settings, check_settings, get_settings
from temporal_client import connect
from webhooks.clicks import router as click_router
from webhooks.payload import InboundPayload
from webhooks.providers.routes import router as provider_router
from webhooks.signature import SignatureError, verify

log = logging.getLogger("sequencer.webhooks")
PIXEL = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)


NO_STORE = {"Cache-Control": "no-store, max-age=0"}


@dataclass
class Deps:
    """What the routes need.

    When Temporal is not reachable at startup the app still serves (/healthz says so,
    unsubscribe links still suppress) and connects again on the next request that needs
    it, so a webhook app started before Temporal recovers without a restart.
    """

    settings: Settings
    session_factory: SessionFactory
    client: Client | None
    pipeline: InboundPipeline
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def temporal(self) -> Client | None:
        """The Temporal client, connecting now if the last attempt failed."""
        if self.client is None:
            async with self.lock:
                if self.client is None:
                    try:
                        self.client = await asyncio.wait_for(connect(self.settings), timeout=5)
                    except Exception as err:
                        log.warning("Temporal not reachable at %s: %s", self.settings.temporal_address, err)
                        return None
                    self.pipeline.client = self.client
        return self.client

    async def inbound(self) -> InboundPipeline | None:
        """The inbound pipeline, ready to signal (None while Temporal is unreachable)."""
        return self.pipeline if await self.temporal() is not None else None


def _pipeline(cfg: Settings, sf: SessionFactory, client: Client | None) -> InboundPipeline:
    return InboundPipeline(
        sf,
        client,
        get_classifier(),
        out_of_office_default=cfg.out_of_office_default_delay,
        trust_thread_only=cfg.inbound_trust_thread_only,
        link_keys=cfg.link_keys(),
    )


def create_app(
    settings: Settings | None = None,
    *,
    session_factory: SessionFactory | None = None,
    client: Client | None = None,
) -> FastAPI:
    """Build the app; dependencies not given are created at startup from settings.

    Startup refuses unsafe production settings (`check_settings`), so `uvicorn` exits
    naming the variable instead of serving forgeable links. The interactive API docs
    (/docs, /redoc, /openapi.json) are served only with `SEQUENCER_ENV=dev`.
    """
    cfg = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        check_settings(cfg, "the webhook app")
        engine = None
        sf = session_factory
        if sf is None:
            engine = make_engine(cfg.database_url)
            sf = make_session_factory(engine)
        cl = client
        if cl is None:
            try:
                cl = await connect(cfg)
            except Exception as err:  # keep serving /healthz, which will say so
                log.error("Temporal not reachable at %s: %s", cfg.temporal_address, err)
        app.state.deps = Deps(cfg, sf, cl, _pipeline(cfg, sf, cl))
        yield
        if engine is not None:
            await engine.dispose()

    docs: dict[str, Any] = {} if not cfg.production else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="Sequencer webhooks", lifespan=lifespan, **docs)
    app.include_router(provider_router)
    app.include_router(click_router)

    def deps(request: Request) -> Deps:
        return request.app.state.deps

    @app.post("/webhooks/{channel}", status_code=202)
    async def inbound(channel: str, request: Request) -> Response:
        d = deps(request)
        limit = d.settings.webhook_max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            return JSONResponse({"error": f"body larger than {limit} bytes"}, status_code=413)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                return JSONResponse({"error": f"body larger than {limit} bytes"}, status_code=413)
        try:
            verify(
                d.settings.webhook_keys(channel),
                request.headers.get("x-signature"),
                body,
                channel=channel,
                now=time.time(),
                window_seconds=d.settings.webhook_replay_window_seconds,
                accept_v1=d.settings.webhook_accept_v1,
            )
        except SignatureError as err:
            return JSONResponse({"error": f"signature: {err}"}, status_code=401)
        if channel not in CHANNELS:
            return JSONResponse(
                {"error": f"unknown channel {channel!r}: use one of {', '.join(CHANNELS)}"},
                status_code=404,
            )
        try:
            payload = InboundPayload.model_validate_json(body)
        except ValidationError as err:
            problems = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in err.errors()]
            return JSONResponse({"error": "invalid body", "fields": problems}, status_code=400)
        pipeline = await d.inbound()
        if pipeline is None:
            return JSONResponse({"error": "Temporal is not reachable; retry later"}, status_code=503)
        try:
            result = await pipeline.process(payload.to_event(channel))
        except Exception as err:  # the event stays unfinished: the provider's retry completes it
            log.exception("inbound %s/%s failed", channel, payload.event_id)
            return JSONResponse(
                {"error": f"could not process the event ({err.__class__.__name__}); retry later"},
                status_code=503,
            )
        return JSONResponse(
            {
                "status": result.status,
                "person_id": result.person_id,
                "enrollments": result.enrollments,
                "classification": result.classification,
            },
            status_code=202,
        )

    @app.get("/u/{token}", response_class=HTMLResponse)
    async def unsubscribe_page(token: str, request: Request) -> HTMLResponse:
        d = deps(request)
        try:
            int(read_token(d.settings.link_keys(), "unsubscribe", token)["p"])
        except (TokenError, KeyError, TypeError, ValueError):
            return HTMLResponse(_page("This link is not valid", "<p>The link may be incomplete.</p>"), 400)
        form = (
            f'<form method="post" action="/u/{html.escape(token)}">'
            '<input type="hidden" name="List-Unsubscribe" value="One-Click">'
            '<button type="submit">Unsubscribe</button></form>'
        )
        return HTMLResponse(_page("Unsubscribe?", "<p>Press the button to stop all messages from us.</p>" + form))

    @app.post("/u/{token}")
    async def unsubscribe(token: str, request: Request) -> Response:
        d = deps(request)
        try:
            data = read_token(d.settings.link_keys(), "unsubscribe", token)
            person_id = int(data["p"])
        except (TokenError, KeyError, TypeError, ValueError):
            return HTMLResponse(_page("This link is not valid", "<p>The link may be incomplete.</p>"), 400)
        await d.temporal()  # signals when Temporal is there; the suppression holds either way
        try:
            await d.pipeline.unsubscribe(
                person_id,
                reason="unsubscribe",
                source="link",
                event_key="link",
                signal_reason="unsubscribe link",
                via="link",
                best_effort=True,
                person_event_key=f"unsubscribed:link:{person_id}",
            )
        except Exception:  # nothing was written: say so, so that the person tries again
            log.exception("unsubscribe of person %s failed", person_id)
            return HTMLResponse(_page("Please try again", "<p>We could not record your request just now.</p>"), 503)
        return HTMLResponse(_page("You are unsubscribed", "<p>You will not hear from us again.</p>"))

    @app.get("/o/{token}")
    async def opened(token: str, request: Request) -> Response:
        d = deps(request)
        try:
            data = read_token(d.settings.link_keys(), "open", token)
            key = str(data["k"])
        except (TokenError, KeyError):
            return Response(PIXEL, media_type="image/gif", headers=NO_STORE)
        try:
            await _record_open(d.session_factory, key)
        except Exception:  # an open is statistics: the image is served whatever happens
            log.exception("recording an open failed")
        return Response(PIXEL, media_type="image/gif", headers=NO_STORE)

    @app.get("/healthz")
    async def healthz(request: Request) -> Response:
        d = deps(request)
        # "up" or "down" only: error texts name hosts, users and addresses, which a public
        # health check must not hand out (they are logged instead).
        report: dict[str, Any] = {}
        try:
            async with d.session_factory() as session:
                await session.execute(text("SELECT 1"))
            report["postgres"] = "up"
        except Exception:
            log.warning("healthz: PostgreSQL is down", exc_info=True)
            report["postgres"] = "down"
        client = await d.temporal()
        report["temporal"] = "down"
        if client is not None:
            try:
                await client.service_client.check_health()
                report["temporal"] = "up"
            except Exception:
                log.warning("healthz: Temporal is down", exc_info=True)
        healthy = all(v == "up" for v in report.values())
        report["status"] = "ok" if healthy else "degraded"
        if report["postgres"] == "up":
            # The sender circuit breaker: shown, not a failure of this app (its leads wait).
            # Ids and kinds only, for the same reason; `senders list` shows the reason.
            async with d.session_factory() as session:
                paused = await paused_senders(session, datetime.now(UTC))
            report["senders"] = {
                "paused": [
                    {
                        "id": a.id,
                        "channel": a.channel,
                        "kind": a.paused_kind,
                        "since": a.paused_at.isoformat() if a.paused_at else None,
                        "probe_after": a.paused_until.isoformat() if a.paused_until else None,
                    }
                    for a in paused
                ]
            }
        return JSONResponse(report, status_code=200 if healthy else 503)

    return app


async def _record_open(sf: SessionFactory, key: str) -> None:
    """One `opened` event per delivery, however often the image is fetched."""
    async with sf() as session, session.begin():
        row = (
            await session.execute(
                select(Delivery, Enrollment, SequenceVersion)
                .join(Enrollment, Enrollment.id == Delivery.enrollment_id)
                .join(SequenceVersion, SequenceVersion.id == Enrollment.sequence_version_id)
                .where(Delivery.idempotency_key == key)
            )
        ).first()
        if row is not None:
            delivery, enrollment, version = row
            await append_event(
                session,
                type_="opened",
                ref=_ref(enrollment, version),
                step_id=delivery.step_id,
                variant=delivery.variant,
                channel=delivery.channel,
                delivery_id=delivery.id,
                dedup_key=f"opened:{delivery.id}",
            )


def _ref(enrollment: Enrollment, version: SequenceVersion) -> EnrollmentRef:
    return EnrollmentRef(
        enrollment_id=enrollment.id,
        person_id=enrollment.person_id,
        sequence=SequenceRef(
            sequence_id=enrollment.sequence_id,
            sequence_name=str(version.definition.get("name", "")),
            version_id=version.id,
            version=version.version,
        ),
        workflow_id=enrollment.workflow_id,
    )


def _page(title: str, body: str) -> str:
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title></head>"
        f"<body style='font-family:sans-serif;max-width:32rem;margin:4rem auto'>"
        f"<h1>{html.escape(title)}</h1>{body}</body></html>"
    )


app = create_app()
