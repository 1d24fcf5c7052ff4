"""Opens and clicks from our own tracking links, appended to the event log once each.

One `opened` event per delivery however often the pixel is fetched, one `clicked` event
per delivery and link whoever reports it (our `/c/` redirect or a provider's webhook):
the dedup keys below are shared with the provider ingest for that reason.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from db.events import append_event
from db.session import SessionFactory
from db.tables import Delivery, Enrollment, SequenceVersion
from models.activities import EnrollmentRef
from models.enrollment import SequenceRef
from models.outcomes import EventType

__all__ = ["click_dedup_key", "open_dedup_key", "record_click", "record_open"]


def click_dedup_key(delivery_id: int, url: str) -> str:
    """One `clicked` event per delivery and link, whoever reports it (provider or /c/)."""
    return f"{EventType.CLICKED}:{delivery_id}:{hashlib.sha256(url.encode()).hexdigest()[:16]}"


def open_dedup_key(delivery_id: int) -> str:
    """One `opened` event per delivery, whoever reports it (our pixel or a provider)."""
    return f"{EventType.OPENED}:{delivery_id}"


async def record_open(sf: SessionFactory, key: str) -> bool:
    """Append the `opened` event of the delivery with this idempotency key (False if known or unknown)."""
    return await _append(sf, key, EventType.OPENED, open_dedup_key, {})


async def record_click(sf: SessionFactory, key: str, url: str) -> bool:
    """Append the `clicked` event for this delivery and link (False if already recorded or unknown)."""
    return await _append(
        sf,
        key,
        EventType.CLICKED,
        lambda delivery_id: click_dedup_key(delivery_id, url),
        {"url": url[:2000], "via": "link"},
    )


async def _append(
    sf: SessionFactory, key: str, type_: EventType, dedup_key: Callable[[int], str], data: dict[str, Any]
) -> bool:
    async with sf() as session, session.begin():
        found = await _delivery(session, key)
        if found is None:
            return False
        delivery, ref = found
        return await append_event(
            session,
            type_=type_,
            ref=ref,
            step_id=delivery.step_id,
            variant=delivery.variant,
            channel=delivery.channel,
            delivery_id=delivery.id,
            dedup_key=dedup_key(delivery.id),
            data=data,
        )


async def _delivery(session: AsyncSession, key: str) -> tuple[Delivery, EnrollmentRef] | None:
    """The delivery with this idempotency key and whom it went to, or None."""
    row = (
        await session.execute(
            select(Delivery, Enrollment, SequenceVersion)
            .join(Enrollment, Enrollment.id == Delivery.enrollment_id)
            .join(SequenceVersion, SequenceVersion.id == Enrollment.sequence_version_id)
            .where(Delivery.idempotency_key == key)
        )
    ).first()
    if row is None:
        return None
    delivery, enrollment, version = row
    ref = EnrollmentRef(
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
    return delivery, ref
