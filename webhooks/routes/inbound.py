"""`POST /webhooks/{channel}`: the signed generic webhook, into the inbound pipeline.

The dependencies run in order and each may refuse: the body within its limit (413), its
signature (401), a known channel (404), a valid body (400), Temporal reachable (503).
Nothing is parsed before the signature holds, nothing connects before the body is valid.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from services.inbound_pipeline import CHANNELS
from webhooks.deps import ReadyPipelineDep, SettingsDep
from webhooks.payload import InboundPayload
from webhooks.refusal import Refusal, read_body
from webhooks.signature import SignatureError, verify

log = logging.getLogger("sequencer.webhooks")
router = APIRouter()


async def signed_body(channel: str, request: Request, settings: SettingsDep) -> bytes:
    """The raw body, once its size and signature hold and the channel is one we serve."""
    body = await read_body(request, settings.webhook_max_body_bytes)
    try:
        verify(
            settings.webhook_keys(channel),
            request.headers.get("x-signature"),
            body,
            channel=channel,
            now=time.time(),
            window_seconds=settings.webhook_replay_window_seconds,
            accept_v1=settings.webhook_accept_v1,
        )
    except SignatureError as err:
        raise Refusal(JSONResponse({"error": f"signature: {err}"}, status_code=401)) from err
    if channel not in CHANNELS:
        raise Refusal(
            JSONResponse({"error": f"unknown channel {channel!r}: use one of {', '.join(CHANNELS)}"}, status_code=404)
        )
    return body


def inbound_payload(body: Annotated[bytes, Depends(signed_body)]) -> InboundPayload:
    """The body parsed strictly; a 400 names every field that is wrong."""
    try:
        return InboundPayload.model_validate_json(body)
    except ValidationError as err:
        problems = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in err.errors()]
        raise Refusal(JSONResponse({"error": "invalid body", "fields": problems}, status_code=400)) from err


@router.post("/webhooks/{channel}", status_code=202)
async def inbound(
    channel: str,
    payload: Annotated[InboundPayload, Depends(inbound_payload)],
    pipeline: ReadyPipelineDep,
) -> JSONResponse:
    """One inbound event: 202 with what the pipeline did, 503 when the sender should retry."""
    try:
        result = await pipeline.process(payload.to_event(channel))
    except Exception as err:  # the event stays unfinished: the provider's retry completes it
        log.exception("inbound %s/%s failed", channel, payload.event_id)
        return JSONResponse(
            {"error": f"could not process the event ({err.__class__.__name__}); retry later"}, status_code=503
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
