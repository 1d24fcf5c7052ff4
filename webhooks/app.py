"""The webhook/API app: inbound events, provider webhooks, our links, health.

`uvicorn webhooks.app:app` builds its dependencies (engine, Temporal client,
classifier) at startup from settings; tests call `create_app(...)` with their own.
The routes live in routers (webhooks/routes/*, webhooks/providers/routes.py) and take
what they need through `Depends` (webhooks/deps.py); the work itself is in services/
and operations/. Every inbound request is authenticated before its body is parsed.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from temporalio.client import Client

from db.session import SessionFactory, make_engine, make_session_factory
from settings import Settings, check_settings, get_settings
from temporal_client import connect
from webhooks.deps import WebhookDeps, build_pipeline
from webhooks.providers.routes import router as provider_router
from webhooks.refusal import Refusal, answer_refusal
from webhooks.routes.health import router as health_router
from webhooks.routes.inbound import router as inbound_router
from webhooks.routes.links import PIXEL
from webhooks.routes.links import router as links_router

log = logging.getLogger("sequencer.webhooks")

__all__ = ["PIXEL", "app", "create_app"]


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
        app.state.deps = WebhookDeps(cfg, sf, cl, build_pipeline(cfg, sf, cl))
        yield
        if engine is not None:
            await engine.dispose()

    docs: dict[str, Any] = {} if not cfg.production else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="Sequencer webhooks", lifespan=lifespan, **docs)
    app.add_exception_handler(Refusal, answer_refusal)
    for router in (provider_router, links_router, inbound_router, health_router):
        app.include_router(router)
    return app


app = create_app()
