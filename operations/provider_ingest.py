"""Provider events into Sequencer: batched records, and the inbound pipeline for the rest.

Two kinds of events arrive from providers, and they are handled differently on purpose:

* *Records* (delivered, opened, clicked, deferred, soft bounce, ignored kinds): a batch
  of them (SendGrid posts up to 1,000 at a time) is deduplicated, matched to ledger
  rows and written to the event log in ONE transaction with a few set-based
  statements. A batch that fails halfway leaves nothing behind, so the provider's
  retry simply does it again; a replay finds every event id already finished.
* *Consequences* (hard bounce, complaint, provider-side unsubscribe, inbound reply,
  follow): each goes through the one inbound pipeline (`to_pipeline`), which resolves
  the person, classifies, applies the consent rules and signals the workflows. Each is
  idempotent per provider event id; one that fails stays `received` and is finished by
  the retry.

Matching an event to a delivery, most trusted first: the delivery key the relay tag
carried back (`sequencer_key`), then the provider's message id stored in the ledger,
then our own Message-ID. An event that matches nothing is recorded as
`unknown_message`, never an error.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import String, any_, bindparam, select, update
from sqlalchemy.dialects.postgresql import ARRAY, insert
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from db.session import SessionFactory
from db.tables import Delivery, Enrollment, Event, Identity, InboundEvent, SequenceVersion
from models.enrollment import ControlSignal
from models.inbound import InboundEvent as PipelineEvent
from models.outcomes import EventType, InboundStatus
from models.provider_events import ProviderEvent
from services.engagement import click_dedup_key, open_dedup_key
from services.identities import lookup_value
from services.inbound_pipeline import InboundPipeline, InboundResult
from services.sender_breaker import BreakerConfig, record_late_bounce

log = logging.getLogger("sequencer.providers")

#: Kinds written as records in the batch transaction (soft bounces too, see `_record_kind`).
RECORD_KINDS = {"delivered", "open", "click", "deferred", "ignored"}
#: The event-log type each record kind becomes.
EVENT_TYPE = {
    "delivered": EventType.DELIVERED,
    "open": EventType.OPENED,
    "click": EventType.CLICKED,
    "deferred": EventType.DEFERRED,
}
#: Consequences (bounces, complaints, replies) of one batch applied at once.
CONSEQUENCE_CONCURRENCY = 8


async def to_pipeline(processor: InboundPipeline, event: PipelineEvent) -> InboundResult:
    """The one place where provider events enter the inbound pipeline."""
    return await processor.process(event)


@dataclass
class IngestSummary:
    """What one request did (the webhook's JSON answer)."""

    received: int = 0
    duplicates: int = 0
    recorded: int = 0
    unknown_message: int = 0
    ignored: int = 0
    pipeline: dict[str, int] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "duplicates": self.duplicates,
            "recorded": self.recorded,
            "unknown_message": self.unknown_message,
            "ignored": self.ignored,
            "pipeline": self.pipeline,
        }


@dataclass
class _Match:
    delivery_id: int
    key: str
    message_id: str | None
    enrollment_id: int
    person_id: int
    workflow_id: str
    sequence_id: int
    version_id: int
    step_id: str
    variant: str | None
    channel: str


def _texts(values: list[str]) -> Any:
    """One `text[]` parameter (for `= ANY(...)`) instead of one parameter per value."""
    return bindparam(None, values, type_=ARRAY(String))


def _record_kind(event: ProviderEvent) -> bool:
    return event.kind in RECORD_KINDS or (event.kind == "bounce" and event.bounce == "soft")


def _id_forms(values: list[str]) -> list[str]:
    out: list[str] = []
    for value in values:
        bare = value.strip().strip("<>").strip()
        if bare:
            out += [bare, f"<{bare}>"]
    return out


class ProviderIngest:
    """Applies a verified, parsed provider batch."""

    def __init__(
        self,
        session_factory: SessionFactory,
        processor: InboundPipeline | None,
        client: Client | None,
        *,
        breaker: BreakerConfig | None = None,
    ):
        self.sf = session_factory
        self.processor = processor
        self.client = client
        #: The sender circuit breaker's thresholds (SENDER_* settings): a hard bounce counts.
        self.breaker = breaker or BreakerConfig()

    async def ingest(self, provider: str, events: list[ProviderEvent]) -> IngestSummary:
        """Deduplicate, record, and send consequences through the pipeline.

        Raises `PipelineUnavailable` when consequences are waiting and Temporal is not
        reachable (the records are kept; the retry finishes the rest).
        """
        summary = IngestSummary(received=len(events))
        unique = list({e.event_id: e for e in events}.values())
        summary.duplicates = len(events) - len(unique)
        todo = await self._claim(provider, unique)
        summary.duplicates += len(unique) - len(todo)
        if not todo:
            return summary
        matches = await self._match(todo)
        records = [e for e in todo if _record_kind(e)]
        if records:
            await self._record(provider, records, matches, summary)
        consequences = [e for e in todo if not _record_kind(e)]
        if consequences and self.processor is None:
            raise PipelineUnavailable("Temporal is not reachable; retry later")
        # Independent events, applied CONSEQUENCE_CONCURRENCY at a time (a batch of bounces should
        # not take a round trip per event in a row); each is marked finished on its own.
        gate = asyncio.Semaphore(CONSEQUENCE_CONCURRENCY)

        async def apply(event: ProviderEvent) -> InboundStatus:
            async with gate:
                status = await self._consequence(event, matches.get(event.event_id))
                async with self.sf() as session, session.begin():
                    await session.execute(
                        update(InboundEvent)
                        .where(InboundEvent.channel == provider, InboundEvent.provider_event_id == event.event_id)
                        .values(status=status)
                    )
                return status

        results = await asyncio.gather(*(apply(e) for e in consequences), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result  # the finished ones are marked; the provider's retry does the rest
            summary.pipeline[result] = summary.pipeline.get(result, 0) + 1
        return summary

    # ------------------------------------------------------------------ dedup
    async def _claim(self, provider: str, events: list[ProviderEvent]) -> list[ProviderEvent]:
        """Insert the inbound rows; return the events not finished before (new or interrupted)."""
        by_id = {e.event_id: e for e in events}
        async with self.sf() as session, session.begin():
            rows = [
                {
                    "channel": provider,
                    "provider_event_id": e.event_id,
                    "type": e.kind if e.kind != "bounce" else f"bounce_{e.bounce}",
                    "from_value": (e.recipient or e.sender or "")[:512],
                    "payload": e.model_dump(mode="json", exclude_none=True),
                    "status": InboundStatus.RECEIVED,
                }
                for e in events
            ]
            # executemany: one cached statement, batched by the driver (not a 1,000-row literal to compile)
            await session.execute(
                insert(InboundEvent).on_conflict_do_nothing(constraint="uq_inbound_events_provider_id"), rows
            )
            found = await session.execute(
                select(InboundEvent.provider_event_id).where(
                    InboundEvent.channel == provider,
                    InboundEvent.provider_event_id == any_(_texts(list(by_id))),
                    InboundEvent.status == InboundStatus.RECEIVED,
                )
            )
            pending = set(found.scalars())
        return [e for e in events if e.event_id in pending]

    # ------------------------------------------------------------------ matching
    async def _match(self, events: list[ProviderEvent]) -> dict[str, _Match]:
        keys = {e.delivery_key for e in events if e.delivery_key}
        ids = set(_id_forms([m for e in events for m in e.message_ids]))
        if not keys and not ids:
            return {}
        base = (
            select(
                Delivery.id,
                Delivery.idempotency_key,
                Delivery.message_id,
                Delivery.provider_message_id,
                Delivery.step_id,
                Delivery.variant,
                Delivery.channel,
                Enrollment.id.label("enrollment_id"),
                Enrollment.person_id,
                Enrollment.workflow_id,
                Enrollment.sequence_id,
                Enrollment.sequence_version_id,
            )
            .join(Enrollment, Enrollment.id == Delivery.enrollment_id)
            .join(SequenceVersion, SequenceVersion.id == Enrollment.sequence_version_id)
        )
        by_key: dict[str, _Match] = {}
        by_id: dict[str, _Match] = {}
        # One indexed lookup per column (an OR of the three would scan), each with one array parameter.
        conditions = []
        if keys:
            conditions.append(Delivery.idempotency_key == any_(_texts(sorted(keys))))
        if ids:
            conditions += [
                Delivery.provider_message_id == any_(_texts(sorted(ids))),
                Delivery.message_id == any_(_texts(sorted(ids))),
            ]
        found_rows: list[Any] = []
        async with self.sf() as session:
            for condition in conditions:
                found_rows += list(await session.execute(base.where(condition)))
            for row in found_rows:
                match = _Match(
                    delivery_id=row.id,
                    key=row.idempotency_key,
                    message_id=row.message_id,
                    enrollment_id=row.enrollment_id,
                    person_id=row.person_id,
                    workflow_id=row.workflow_id,
                    sequence_id=row.sequence_id,
                    version_id=row.sequence_version_id,
                    step_id=row.step_id,
                    variant=row.variant,
                    channel=row.channel,
                )
                by_key[row.idempotency_key] = match
                for value in (row.message_id, row.provider_message_id):
                    for form in _id_forms([value] if value else []):
                        by_id[form] = match
        out: dict[str, _Match] = {}
        for event in events:
            found = by_key.get(event.delivery_key or "")
            if found is None:
                found = next((by_id[f] for f in _id_forms(event.message_ids) if f in by_id), None)
            if found is not None:
                out[event.event_id] = found
        return out

    # ------------------------------------------------------------------ records
    async def _record(
        self, provider: str, events: list[ProviderEvent], matches: dict[str, _Match], summary: IngestSummary
    ) -> None:
        """Events and statuses for a whole batch in one transaction (all or nothing)."""
        rows: list[dict[str, Any]] = []
        status: dict[str, InboundStatus] = {}
        now = datetime.now(UTC)
        for event in events:
            match = matches.get(event.event_id)
            if event.kind == "ignored":
                status[event.event_id] = InboundStatus.IGNORED
                summary.ignored += 1
                continue
            if match is None:
                status[event.event_id] = InboundStatus.UNKNOWN_MESSAGE
                summary.unknown_message += 1
                continue
            status[event.event_id] = InboundStatus.RECORDED
            summary.recorded += 1
            if event.kind == "bounce":
                type_, dedup = EventType.SOFT_BOUNCED, f"{EventType.SOFT_BOUNCED}:{provider}:{event.event_id}"
            elif event.kind == "open":
                type_, dedup = EventType.OPENED, open_dedup_key(match.delivery_id)
            elif event.kind == "click":
                type_, dedup = EventType.CLICKED, click_dedup_key(match.delivery_id, event.url or "")
            elif event.kind == "delivered":
                type_, dedup = EventType.DELIVERED, f"{EventType.DELIVERED}:{match.delivery_id}"
            else:
                type_, dedup = EVENT_TYPE[event.kind], f"{event.kind}:{provider}:{event.event_id}"
            data = {"provider": provider, "provider_event_id": event.event_id}
            if event.url:
                data["url"] = event.url[:2000]
            if event.reason:
                data["reason"] = event.reason[:500]
            rows.append(
                {
                    "type": type_,
                    "person_id": match.person_id,
                    "enrollment_id": match.enrollment_id,
                    "sequence_id": match.sequence_id,
                    "sequence_version_id": match.version_id,
                    "step_id": match.step_id,
                    "variant": match.variant,
                    "channel": match.channel,
                    "delivery_id": match.delivery_id,
                    "occurred_at": event.occurred_at or now,
                    "dedup_key": dedup[:300],
                    "data": data,
                }
            )
        async with self.sf() as session, session.begin():
            if rows:
                await session.execute(insert(Event).on_conflict_do_nothing(index_elements=["dedup_key"]), rows)
            for value in (InboundStatus.RECORDED, InboundStatus.UNKNOWN_MESSAGE, InboundStatus.IGNORED):
                ids = [k for k, v in status.items() if v == value]
                if ids:
                    await session.execute(
                        update(InboundEvent)
                        .where(InboundEvent.channel == provider, InboundEvent.provider_event_id == any_(_texts(ids)))
                        .values(status=value)
                    )

    # ------------------------------------------------------------------ consequences
    async def _consequence(self, event: ProviderEvent, match: _Match | None) -> InboundStatus:
        assert self.processor is not None
        if event.kind == "unsubscribe":
            return await self._unsubscribe(event, match)
        common: dict[str, Any] = {
            "source": f"provider:{event.provider}",
            "event_id": f"{event.provider}:{event.event_id}"[:300],
            "occurred_at": event.occurred_at,
        }
        if event.kind in ("reply", "followed_back"):
            if not event.sender:
                return InboundStatus.UNKNOWN_SENDER
            inbound = PipelineEvent(
                channel=event.channel,
                type="reply" if event.kind == "reply" else "followed_back",
                sender=event.sender[:512],
                text=(event.text or None) and event.text[:100_000],
                in_reply_to=event.in_reply_to,
                references=event.references[:100],
                **common,
            )
            return (await to_pipeline(self.processor, inbound)).status
        recipient = (event.recipient or "")[:512]
        inbound = PipelineEvent(
            channel="email",
            type="complaint" if event.kind == "complaint" else "bounce",
            sender=recipient or "unknown",  # as the signed webhook: the address the report is about
            permanent=True,
            in_reply_to=match.message_id if match else None,
            about_message_ids=[match.message_id] if match and match.message_id else [],
            about_recipients=[recipient] if recipient else [],
            provider_message_id=(event.message_ids[0][:400] if event.message_ids else None),
            detail={"reason": event.reason} if event.reason else {},
            **common,
        )
        result = await to_pipeline(self.processor, inbound)
        if event.kind == "bounce" and match is not None:
            await self._end_bounced(event, match)
        return result.status

    async def _end_bounced(self, event: ProviderEvent, match: _Match) -> None:
        """A hard bounce after acceptance: the ledger row says so (when the pipeline could not
        name the delivery), its sender's bounce rate is checked, and that lead ends."""
        error = f"{event.provider}: {event.reason or 'hard bounce'}"
        async with self.sf() as session, session.begin():
            await record_late_bounce(session, match.delivery_id, error, self.breaker, datetime.now(UTC))
        await self._signal(
            [match.workflow_id],
            "stop",
            ControlSignal(reason=f"bounced: hard bounce reported by {event.provider}", source=event.provider),
        )

    async def _unsubscribe(self, event: ProviderEvent, match: _Match | None) -> InboundStatus:
        """A provider-side unsubscribe: suppress the person and stop every sequence."""
        person_id = match.person_id if match else None
        if person_id is None and event.recipient:
            try:
                value = lookup_value("email", event.recipient)
            except ValueError:
                value = None
            if value:
                async with self.sf() as session:
                    person_id = (
                        await session.execute(
                            select(Identity.person_id).where(Identity.channel == "email", Identity.value == value)
                        )
                    ).scalar_one_or_none()
        if person_id is None:
            return InboundStatus.UNKNOWN_SENDER
        assert self.processor is not None
        key = f"{event.provider}:{event.event_id}"[:200]
        await self.processor.unsubscribe(
            person_id,
            reason="unsubscribe",
            source=key,
            event_key=key,
            signal_reason=f"unsubscribed at {event.provider}",
            via=event.provider,
            channel="email",
        )
        return InboundStatus.UNSUBSCRIBED

    async def _signal(self, workflow_ids: list[str], name: str, arg: ControlSignal) -> None:
        if self.client is None:
            raise PipelineUnavailable("Temporal is not reachable; retry later")
        for wid in workflow_ids:
            try:
                await self.client.get_workflow_handle(wid).signal(name, arg)
            except RPCError as err:
                if err.status != RPCStatusCode.NOT_FOUND:
                    raise
                log.info("signal %s to %s not delivered: %s", name, wid, err)


class PipelineUnavailable(RuntimeError):
    """Consequences cannot be applied now (Temporal unreachable): the provider should retry."""
