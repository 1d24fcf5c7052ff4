"""`GET /c/{token}`: record one `clicked` event per delivery and link, then redirect.

The target URL is only ever the one sealed inside the token (services/click_tracking.py),
so this is not an open redirect; a token that does not read (forged, altered, made for
another purpose, or for another deployment) is a 404 page and records nothing.
Recording is statistics: if the database is down the person is still redirected.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert

from db.session import SessionFactory
from db.tables import Delivery, Enrollment, Event
from models.outcomes import EventType
from services.click_tracking import trackable
from services.tokens import TokenError, read_token
from webhooks.providers.ingest import click_dedup_key

log = logging.getLogger("sequencer.clicks")
router = APIRouter()
NOT_FOUND = (
    "<!doctype html><html><head><meta charset='utf-8'><title>Link not found</title></head>"
    "<body style='font-family:sans-serif;max-width:32rem;margin:4rem auto'><h1>Link not found</h1>"
    "<p>This link is incomplete or was changed. Please use the link exactly as it appears in the email.</p>"
    "</body></html>"
)


async def record_click(sf: SessionFactory, key: str, url: str) -> bool:
    """Append the `clicked` event for this delivery and link (False if already recorded or unknown)."""
    async with sf() as session, session.begin():
        row = (
            await session.execute(
                select(Delivery, Enrollment)
                .join(Enrollment, Enrollment.id == Delivery.enrollment_id)
                .where(Delivery.idempotency_key == key)
            )
        ).first()
        if row is None:
            return False
        delivery, enrollment = row
        inserted = await session.execute(
            insert(Event)
            .values(
                type=EventType.CLICKED,
                person_id=enrollment.person_id,
                enrollment_id=enrollment.id,
                sequence_id=enrollment.sequence_id,
                sequence_version_id=enrollment.sequence_version_id,
                step_id=delivery.step_id,
                variant=delivery.variant,
                channel=delivery.channel,
                delivery_id=delivery.id,
                dedup_key=click_dedup_key(delivery.id, url),
                data={"url": url[:2000], "via": "link"},
            )
            .on_conflict_do_nothing(index_elements=["dedup_key"])
            .returning(Event.id)
        )
        return inserted.scalar_one_or_none() is not None


@router.get("/c/{token}")
async def click(token: str, request: Request) -> Response:
    deps = request.app.state.deps
    try:
        data = read_token(deps.settings.link_keys(), "click", token)
        key, url = str(data["k"]), str(data["u"])
    except (TokenError, KeyError, TypeError):
        return HTMLResponse(NOT_FOUND, status_code=404)
    if not trackable(url):
        return HTMLResponse(NOT_FOUND, status_code=404)
    try:
        await record_click(deps.session_factory, key, url)
    except Exception:  # statistics only: never keep the person from their link
        log.exception("recording a click failed")
    headers = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}
    return RedirectResponse(url, status_code=302, headers=headers)
