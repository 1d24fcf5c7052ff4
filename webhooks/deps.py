"""What the routes depend on, as FastAPI dependencies (`Depends`).

`create_app` builds one `WebhookDeps` at startup (or takes the test's own session
factory and client) and keeps it on the app; routes never read `app.state` themselves,
they declare what they need: `SettingsDep`, `SessionsDep`, `TemporalDep`, `PipelineDep`.
A dependency that refuses the request raises `Refusal` with the response to send
(see `webhooks.refusal`), so that checks run in the order the route declares them: a
request is authenticated before anything connects to Temporal on its behalf.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from temporalio.client import Client

from db.session import SessionFactory
from services.classify import get_classifier
from services.inbound_pipeline import InboundPipeline
from services.sender_breaker import BreakerConfig
from settings import Settings
from temporal_client import connect
from webhooks.providers.ses import CertificateCache
from webhooks.refusal import Refusal

log = logging.getLogger("sequencer.webhooks")

__all__ = [
    "PipelineDep",
    "ReadyPipelineDep",
    "SessionsDep",
    "SettingsDep",
    "SnsCertsDep",
    "TemporalDep",
    "WebhookDeps",
    "WebhookDepsDep",
    "build_pipeline",
]


def build_pipeline(cfg: Settings, sf: SessionFactory, client: Client | None) -> InboundPipeline:
    """The inbound pipeline the app feeds, configured from settings."""
    return InboundPipeline(
        sf,
        client,
        get_classifier(),
        out_of_office_default=cfg.out_of_office_default_delay,
        trust_thread_only=cfg.inbound_trust_thread_only,
        link_keys=cfg.link_keys(),
        breaker=BreakerConfig.from_settings(cfg),
    )


@dataclass
class WebhookDeps:
    """Everything the routes need, built once per app.

    When Temporal is not reachable at startup the app still serves (/healthz says so,
    unsubscribe links still suppress) and connects again on the next request that needs
    it, so a webhook app started before Temporal recovers without a restart.
    """

    settings: Settings
    session_factory: SessionFactory
    client: Client | None
    pipeline: InboundPipeline
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    sns_certs: CertificateCache | None = None

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

    def certificates(self) -> CertificateCache:
        """SNS signing certificates, fetched once per app from the allow-listed host."""
        if self.sns_certs is None:
            cfg = self.settings
            self.sns_certs = CertificateCache(cfg.sns_cert_host_pattern, ca_file=cfg.sns_ca_file or None)
        return self.sns_certs


def _deps(request: Request) -> WebhookDeps:
    deps: WebhookDeps = request.app.state.deps
    return deps


WebhookDepsDep = Annotated[WebhookDeps, Depends(_deps)]


def _settings(deps: WebhookDepsDep) -> Settings:
    return deps.settings


def _sessions(deps: WebhookDepsDep) -> SessionFactory:
    return deps.session_factory


async def _temporal(deps: WebhookDepsDep) -> Client | None:
    return await deps.temporal()


async def _pipeline(deps: WebhookDepsDep) -> InboundPipeline:
    """The pipeline after an attempt to reach Temporal (it suppresses without; signals skipped)."""
    await deps.temporal()
    return deps.pipeline


async def _ready_pipeline(deps: WebhookDepsDep) -> InboundPipeline:
    """The pipeline able to signal enrollments now, or 503: the sender retries later."""
    pipeline = await deps.inbound()
    if pipeline is None:
        raise Refusal(JSONResponse({"error": "Temporal is not reachable; retry later"}, status_code=503))
    return pipeline


def _certs(deps: WebhookDepsDep) -> CertificateCache:
    return deps.certificates()


SettingsDep = Annotated[Settings, Depends(_settings)]
SessionsDep = Annotated[SessionFactory, Depends(_sessions)]
TemporalDep = Annotated[Client | None, Depends(_temporal)]
PipelineDep = Annotated[InboundPipeline, Depends(_pipeline)]
ReadyPipelineDep = Annotated[InboundPipeline, Depends(_ready_pipeline)]
SnsCertsDep = Annotated[CertificateCache, Depends(_certs)]
