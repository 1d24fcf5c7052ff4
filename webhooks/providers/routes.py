"""`POST /webhooks/providers/{provider}`: each provider's own format and signature.

Every request is authenticated with the provider's own scheme before its body is parsed
(401 naming what is wrong), parsed strictly (400 naming the field), then handed to
`ProviderIngest`. Answers are 200 with a summary (providers retry anything else); 503
when the consequences cannot be applied now, so that the provider retries.

| provider          | authentication                                        | setting                        |
|-------------------|-------------------------------------------------------|--------------------------------|
| sendgrid          | ECDSA P-256 over timestamp + body                     | SENDGRID_WEBHOOK_PUBLIC_KEYS   |
| sendgrid-inbound  | basic auth in the Inbound Parse URL                   | SENDGRID_INBOUND_CREDENTIALS   |
| postmark          | basic auth (webhooks and inbound)                     | POSTMARK_WEBHOOK_CREDENTIALS   |
| mailgun           | HMAC-SHA256(timestamp + token), token used once       | MAILGUN_SIGNING_KEYS           |
| ses               | SNS signature v1/v2, allow-listed certificate host    | SES_TOPIC_ARNS                 |
| resend            | Standard Webhooks                                     | RESEND_WEBHOOK_SECRETS         |
| x                 | CRC (GET) and x-twitter-webhooks-signature            | X_CONSUMER_SECRETS             |
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from email.parser import BytesParser
from email.policy import HTTP

import httpx
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import SecretStr, ValidationError
from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert

from db.session import SessionFactory
from db.tables import InboundEvent, WebhookToken
from operations.provider_ingest import PipelineUnavailable, ProviderIngest
from webhooks.deps import SettingsDep, WebhookDeps, WebhookDepsDep
from webhooks.providers import mailgun, postmark, sendgrid, ses, standard, x_activity
from webhooks.providers.base import ProviderAuthError, ProviderEvent, ProviderFormatError, basic_auth_ok
from webhooks.refusal import read_body

log = logging.getLogger("sequencer.providers")
router = APIRouter()
PROVIDERS = ("sendgrid", "sendgrid-inbound", "postmark", "mailgun", "ses", "resend", "x")


def _secrets(values: list[SecretStr]) -> list[str]:
    return [v.get_secret_value() for v in values if v.get_secret_value()]


def form_fields(content_type: str, body: bytes) -> dict[str, str]:
    """The text fields of a multipart/form-data body (files are skipped)."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise ProviderFormatError("Content-Type", "expected multipart/form-data")
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise ProviderFormatError("body", "not a multipart/form-data body")
    fields: dict[str, str] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str) or part.get_filename():
            continue
        payload = part.get_payload(decode=True)
        raw = payload if isinstance(payload, bytes) else b""
        fields[name] = raw.decode(part.get_content_charset() or "utf-8", "replace")
    return fields


async def _remember_token(
    sf: SessionFactory, provider: str, token: str, event_ids: list[str], *, keep_seconds: int
) -> None:
    """Accept a signature token once: again only for a retry of the very same event.

    Tokens older than `keep_seconds` are forgotten: their timestamps are outside the
    replay window by then, so they are refused before this table is consulted.
    """
    marker = ",".join(event_ids)[:200] or "-"
    async with sf() as session, session.begin():
        await session.execute(
            delete(WebhookToken).where(
                WebhookToken.provider == provider,
                WebhookToken.seen_at < func.now() - timedelta(seconds=keep_seconds),
            )
        )
        new = (
            await session.execute(
                insert(WebhookToken)
                .values(provider=provider, token=f"{token}"[:200])
                .on_conflict_do_nothing()
                .returning(WebhookToken.token)
            )
        ).scalar_one_or_none()
        if new is None:
            seen = (
                await session.execute(
                    select(InboundEvent.id).where(
                        InboundEvent.channel == provider, InboundEvent.provider_event_id.in_(event_ids or [marker])
                    )
                )
            ).first()
            if seen is None:
                raise ProviderAuthError("this signature token was already used (a replayed request)")


@router.get("/webhooks/providers/x")
async def x_crc(cfg: SettingsDep, crc_token: str | None = None) -> Response:
    """X's challenge-response check, answered from memory (X allows ~3 seconds)."""
    secrets = _secrets(cfg.x_consumer_secrets)
    if not secrets:
        return JSONResponse({"error": "no X consumer secret is configured (X_CONSUMER_SECRETS)"}, status_code=401)
    if not crc_token:
        return JSONResponse({"error": "crc_token: query parameter is missing"}, status_code=400)
    return JSONResponse(x_activity.crc_response(secrets[0], crc_token))


@router.post("/webhooks/providers/{provider}")
async def provider_webhook(provider: str, request: Request, deps: WebhookDepsDep) -> Response:
    """One provider delivery: verify, parse, ingest (Temporal is reached only after verifying)."""
    cfg = deps.settings
    if provider not in PROVIDERS:
        return JSONResponse({"error": f"unknown provider {provider!r}: use one of {', '.join(PROVIDERS)}"}, 404)
    body = await read_body(request, cfg.provider_max_body_bytes)
    headers = {k.lower(): v for k, v in request.headers.items()}
    now = time.time()
    window = cfg.provider_replay_window_seconds
    try:
        events, extra = await _verify_and_parse(deps, provider, headers, body, now, window)
    except ProviderAuthError as err:
        return JSONResponse({"error": f"authentication: {err}"}, status_code=401)
    except ProviderFormatError as err:
        return JSONResponse({"error": "invalid body", "field": err.field, "problem": err.problem}, status_code=400)
    except ValidationError as err:  # a value of the right type but out of range (an id too long, …)
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        return JSONResponse({"error": "invalid body", "field": field, "problem": first["msg"]}, status_code=400)
    if extra is not None:
        return extra
    processor = await deps.inbound()
    ingest = ProviderIngest(deps.session_factory, processor, deps.client, breaker=deps.pipeline.breaker)
    try:
        summary = await ingest.ingest(provider, events)
    except PipelineUnavailable as err:
        return JSONResponse({"error": str(err)}, status_code=503)
    except Exception as err:  # nothing finished is marked finished: the provider's retry completes it
        log.exception("provider %s batch failed", provider)
        return JSONResponse({"error": f"could not process ({err.__class__.__name__}); retry later"}, 503)
    return JSONResponse({"status": "ok", **summary.as_json()})


async def _verify_and_parse(
    deps: WebhookDeps, provider: str, headers: dict[str, str], body: bytes, now: float, window: int
) -> tuple[list[ProviderEvent], Response | None]:
    cfg = deps.settings
    if provider == "sendgrid":
        sendgrid.verify(cfg.sendgrid_webhook_public_keys, headers, body, now=now, window_seconds=window)
        return sendgrid.parse_events(body), None
    if provider == "sendgrid-inbound":
        basic_auth_ok(headers.get("authorization"), _secrets(cfg.sendgrid_inbound_credentials))
        return [sendgrid.parse_inbound(form_fields(headers.get("content-type", ""), body))], None
    if provider == "postmark":
        postmark.verify(_secrets(cfg.postmark_webhook_credentials), headers.get("authorization"))
        return postmark.parse(body), None
    if provider == "mailgun":
        data = mailgun.load(body) if body.strip().startswith(b"{") else None
        if data is None:
            raise ProviderAuthError("missing signature object (expected Mailgun's JSON webhook body)")
        token = mailgun.verify(_secrets(cfg.mailgun_signing_keys), data, now=now, window_seconds=window)
        events = mailgun.parse(data)
        keep = 2 * window + 600  # well past the window (clock skew both ways)
        await _remember_token(deps.session_factory, provider, token, [e.event_id for e in events], keep_seconds=keep)
        return events, None
    if provider == "ses":
        msg = ses.load(body)
        certs = deps.certificates()
        await ses.verify(msg, certs, cfg.ses_topic_arns, now=now, max_age_seconds=cfg.sns_max_age_seconds)
        if msg["Type"] == "SubscriptionConfirmation":
            try:
                await certs.confirm(str(msg.get("SubscribeURL", "")))
            except (RuntimeError, OSError, httpx.HTTPError) as err:
                return [], JSONResponse({"error": f"could not confirm the subscription: {err}"}, status_code=503)
            return [], JSONResponse({"status": "subscription confirmed", "topic": msg["TopicArn"]})
        if msg["Type"] == "UnsubscribeConfirmation":
            log.warning("SNS topic %s unsubscribed this endpoint", msg["TopicArn"])
            return [], JSONResponse({"status": "unsubscribe noted", "topic": msg["TopicArn"]})
        return ses.parse(msg), None
    if provider == "resend":
        webhook_id = standard.verify(_secrets(cfg.resend_webhook_secrets), headers, body)
        return standard.parse(body, webhook_id), None
    x_activity.verify(_secrets(cfg.x_consumer_secrets), headers.get(x_activity.SIGNATURE_HEADER), body)
    return x_activity.parse(body), None
