"""From a verified inbound event to signals on every affected enrollment.

Kept apart from the HTTP layer so that its rules can be read in one place:

* Deduplicated by (channel, provider event id) in `inbound_events`: a repeat does
  nothing.
* The sender is resolved through the identity graph (and, for email, through
  In-Reply-To / References against our own Message-IDs) to a person; every active
  enrollment of that person is signalled, so a reply on X branches the email
  sequence too. Unknown senders are recorded, not errors.
* Replies are classified first: out-of-office is not a reply (the next step moves
  after the return date), unsubscribe intent suppresses and stops, and positive /
  negative / neutral are kept for statistics.
* Unsubscribes, complaints and unsubscribe-intent replies suppress the whole person:
  one "stop" stops every sequence on every channel (the consent-safe reading).
  A bounce suppresses only the identity that bounced.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, time
from typing import Any, Literal

from pydantic import BaseModel, Field
from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert
from temporalio.client import Client
from temporalio.service import RPCError

from activities.records import append_event
from db.session import SessionFactory
from db.tables import (
    Delivery,
    Enrollment,
    InboundEvent,
    Person,
    SequenceVersion,
    Suppression,
)
from models.activities import EnrollmentRef
from models.durations import parse_duration
from models.enrollment import ControlSignal, InboundSignal, OutOfOfficeSignal, SequenceRef
from services.classify import ReplyClassifier
from services.identities import find_person_by_identity

log = logging.getLogger("sequencer.inbound")

CHANNELS = ("email", "x", "linkedin", "xmtp")
EventType = Literal["reply", "connection_accepted", "followed_back", "replied_to_note", "bounce", "complaint"]
SIGNAL_FOR = {
    "reply": "replied",
    "connection_accepted": "connection_accepted",
    "followed_back": "followed_back",
    "replied_to_note": "replied_to_note",
}


class InboundPayload(BaseModel):
    """The body of `POST /webhooks/{channel}`."""

    event_id: str = Field(min_length=1, max_length=300)
    type: EventType
    from_: str = Field(alias="from", min_length=1, max_length=512)
    text: str | None = Field(default=None, max_length=100_000)
    in_reply_to: str | None = Field(default=None, max_length=1000)
    references: list[str] = Field(default_factory=list, max_length=100)
    occurred_at: datetime | None = None

    model_config = {"populate_by_name": True, "extra": "ignore"}


@dataclass
class InboundResult:
    """What processing did (returned as the webhook's JSON)."""

    status: str
    person_id: int | None = None
    enrollments: int = 0
    classification: str | None = None


@dataclass
class ActiveEnrollment:
    """An enrollment to signal, with what events need to attribute to it."""

    ref: EnrollmentRef
    workflow_id: str
    current_step: str | None
    variant: str | None
    hold_company: bool


class InboundProcessor:
    """Applies inbound events: records, suppressions and workflow signals."""

    def __init__(
        self,
        session_factory: SessionFactory,
        client: Client,
        classifier: ReplyClassifier,
        *,
        out_of_office_default: str = "7d",
    ) -> None:
        self.session_factory = session_factory
        self.client = client
        self.classifier = classifier
        self.ooo_default = parse_duration(out_of_office_default)

    async def process(self, channel: str, payload: InboundPayload) -> InboundResult:
        """Handle one verified event (idempotent per event id)."""
        received = datetime.now(UTC)
        async with self.session_factory() as session, session.begin():
            new_id = (
                await session.execute(
                    insert(InboundEvent)
                    .values(
                        channel=channel,
                        provider_event_id=payload.event_id,
                        type=payload.type,
                        from_value=payload.from_,
                        payload=payload.model_dump(mode="json", by_alias=True),
                        status="received",
                    )
                    .on_conflict_do_nothing(constraint="uq_inbound_events_provider_id")
                    .returning(InboundEvent.id)
                )
            ).scalar_one_or_none()
        if new_id is None:
            return InboundResult(status="duplicate")

        person_id = await self._resolve(channel, payload)
        if person_id is None:
            await self._mark(new_id, "unknown_sender", None, None)
            log.info("inbound %s/%s from unknown sender %r", channel, payload.event_id, payload.from_)
            return InboundResult(status="unknown_sender")

        label: str | None = None
        return_date = None
        if payload.type == "reply" and payload.text:
            verdict = self.classifier.classify(payload.text, received_at=payload.occurred_at or received)
            label, return_date = verdict.label, verdict.return_date
        active = await self._active_enrollments(person_id)
        signal_id = f"{channel}:{payload.event_id}"

        if payload.type in ("complaint",) or label == "unsubscribe":
            reason = "complaint" if payload.type == "complaint" else "unsubscribe reply"
            await suppress_person(self.session_factory, person_id, reason, f"{channel}:{payload.event_id}")
            await self._signal_all(active, "unsubscribe", ControlSignal(reason=reason, source=channel))
            await self._log(active, person_id, "unsubscribed", channel, signal_id, {"via": reason})
            status = "unsubscribed"
        elif payload.type == "bounce":
            await self._suppress_identity(channel, payload.from_, person_id, signal_id)
            await self._log(active, person_id, "bounced", channel, signal_id, {"via": "webhook"})
            status = "suppressed_identity"
        elif label == "out_of_office":
            until = datetime.combine(return_date, time(9, 0), tzinfo=UTC) if return_date else None
            sig = OutOfOfficeSignal(
                event_id=signal_id,
                until=until,
                default_delay_seconds=self.ooo_default.total_seconds(),
            )
            await self._signal_all(active, "out_of_office", sig)
            await self._log(
                active,
                person_id,
                "out_of_office",
                channel,
                signal_id,
                {"until": until.isoformat() if until else None},
            )
            status = "rescheduled"
        else:
            kind = SIGNAL_FOR[payload.type]
            sig_in = InboundSignal(
                event_id=signal_id,
                channel=channel,
                text=(payload.text or "")[:2000] or None,
                occurred_at=payload.occurred_at or received,
                classification=label,
            )
            await self._signal_all(active, kind, sig_in)
            event_type = "replied" if payload.type in ("reply", "replied_to_note") else payload.type
            await self._log(active, person_id, event_type, channel, signal_id, {"classification": label})
            if label == "positive":
                await self._log(active, person_id, "positive_reply", channel, signal_id, {})
            if payload.type == "reply":
                await self._hold_company(person_id, active)
            status = "signalled"
        await self._mark(new_id, status, person_id, label)
        return InboundResult(status=status, person_id=person_id, enrollments=len(active), classification=label)

    # ------------------------------------------------------------------ helpers
    async def _resolve(self, channel: str, payload: InboundPayload) -> int | None:
        async with self.session_factory() as session:
            candidates = [channel]
            if channel == "x":
                candidates = ["x", "x_handle"]
            for ident_channel in candidates:
                try:
                    person = await find_person_by_identity(session, ident_channel, payload.from_)
                except ValueError:
                    person = None
                if person is not None:
                    return int(person.id)
            if channel == "email":
                ids = [payload.in_reply_to, *payload.references]
                ids = [i.strip() for i in ids if i and i.strip()]
                if ids:
                    row = (
                        await session.execute(
                            select(Enrollment.person_id)
                            .join(Delivery, Delivery.enrollment_id == Enrollment.id)
                            .where(Delivery.message_id.in_(ids))
                            .limit(1)
                        )
                    ).scalar_one_or_none()
                    if row is not None:
                        return int(row)
        return None

    async def _active_enrollments(self, person_id: int) -> list[ActiveEnrollment]:
        async with self.session_factory() as session:
            rows = (
                await session.execute(
                    select(Enrollment, SequenceVersion)
                    .join(SequenceVersion, SequenceVersion.id == Enrollment.sequence_version_id)
                    .where(Enrollment.person_id == person_id, Enrollment.status.in_(["active", "paused"]))
                )
            ).all()
            out = []
            for enrollment, version in rows:
                variant = (
                    await session.execute(
                        select(Delivery.variant)
                        .where(Delivery.enrollment_id == enrollment.id)
                        .order_by(Delivery.id.desc())
                        .limit(1)
                    )
                ).scalar_one_or_none()
                definition: dict[str, Any] = version.definition
                out.append(
                    ActiveEnrollment(
                        ref=EnrollmentRef(
                            enrollment_id=enrollment.id,
                            person_id=person_id,
                            sequence=SequenceRef(
                                sequence_id=enrollment.sequence_id,
                                sequence_name=str(definition.get("name", "")),
                                version_id=version.id,
                                version=version.version,
                            ),
                            workflow_id=enrollment.workflow_id,
                        ),
                        workflow_id=enrollment.workflow_id,
                        current_step=enrollment.current_step,
                        variant=variant,
                        hold_company=bool(definition.get("hold_company_on_reply")),
                    )
                )
        return out

    async def _signal_all(self, active: list[ActiveEnrollment], name: str, arg: BaseModel) -> None:
        async def one(item: ActiveEnrollment) -> None:
            try:
                await self.client.get_workflow_handle(item.workflow_id).signal(name, arg)
            except RPCError as err:  # finished in the meantime: nothing to change
                log.info("signal %s to %s not delivered: %s", name, item.workflow_id, err)

        await asyncio.gather(*(one(a) for a in active))

    async def _log(
        self,
        active: list[ActiveEnrollment],
        person_id: int,
        type_: str,
        channel: str,
        event_key: str,
        data: dict[str, Any],
    ) -> None:
        async with self.session_factory() as session, session.begin():
            if not active:
                await append_event(
                    session,
                    type_=type_,
                    person_id=person_id,
                    channel=channel,
                    dedup_key=f"{type_}:{event_key}",
                    data=data,
                )
            for item in active:
                await append_event(
                    session,
                    type_=type_,
                    ref=item.ref,
                    step_id=item.current_step,
                    variant=item.variant,
                    channel=channel,
                    dedup_key=f"{type_}:{event_key}:{item.ref.enrollment_id}",
                    data=data,
                )

    async def _mark(self, row_id: int, status: str, person_id: int | None, label: str | None) -> None:
        async with self.session_factory() as session, session.begin():
            await session.execute(
                update(InboundEvent)
                .where(InboundEvent.id == row_id)
                .values(status=status, person_id=person_id, classification=label)
            )

    async def _suppress_identity(self, channel: str, value: str, person_id: int, source: str) -> None:
        async with self.session_factory() as session, session.begin():
            person = None
            for ident_channel in ["x", "x_handle"] if channel == "x" else [channel]:
                try:
                    person = await find_person_by_identity(session, ident_channel, value)
                except ValueError:
                    person = None
                if person is not None:
                    from db.tables import Identity

                    ident = (
                        (
                            await session.execute(
                                select(Identity).where(
                                    Identity.person_id == person.id, Identity.channel == ident_channel
                                )
                            )
                        )
                        .scalars()
                        .first()
                    )
                    if ident is not None:
                        session.add(Suppression(identity_id=ident.id, reason="bounce", source=source))
                        return
            session.add(Suppression(person_id=person_id, reason="bounce", source=source))

    async def _hold_company(self, person_id: int, active: list[ActiveEnrollment]) -> None:
        """Pause the colleagues' enrollments in sequences that ask for it."""
        holding = [a for a in active if a.hold_company]
        if not holding:
            return
        async with self.session_factory() as session:
            person = await session.get(Person, person_id)
            if person is None or not person.company:
                return
            rows = (
                await session.execute(
                    select(Enrollment.workflow_id)
                    .join(Person, Person.id == Enrollment.person_id)
                    .where(
                        Person.company == person.company,
                        Person.id != person_id,
                        Enrollment.status == "active",
                        Enrollment.sequence_id.in_([a.ref.sequence.sequence_id for a in holding]),
                    )
                )
            ).scalars()
            ids = list(rows)
        sig = ControlSignal(reason=f"colleague {person_id} at {person.company} replied", source="company-hold")

        async def one(wid: str) -> None:
            try:
                await self.client.get_workflow_handle(wid).signal("pause", sig)
            except RPCError:
                pass

        await asyncio.gather(*(one(w) for w in ids))


async def suppress_person(session_factory: SessionFactory, person_id: int, reason: str, source: str) -> bool:
    """Suppress a whole person (idempotent); True when a new suppression was written."""
    async with session_factory() as session, session.begin():
        await session.execute(select(Person.id).where(Person.id == person_id).with_for_update())
        exists = (
            await session.execute(
                select(Suppression.id).where(Suppression.person_id == person_id, Suppression.reason == reason)
            )
        ).first()
        if exists:
            return False
        session.add(Suppression(person_id=person_id, reason=reason, source=source))
    return True


__all__ = ["InboundProcessor", "InboundPayload", "InboundResult", "suppress_person", "CHANNELS"]
