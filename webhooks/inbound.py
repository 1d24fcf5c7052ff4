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
* A reply matched only through In-Reply-To/References, whose From is not one of that
  person's identities (a forwarded mail, or someone who got hold of a Message-ID), is
  recorded (`reply_unverified`) and changes nothing: no stop, unsubscribe, complaint,
  out-of-office delay or company hold, unless `INBOUND_TRUST_THREAD_ONLY` allows it.
  Bounces are exempt: a mailer-daemon's report never comes from the person.
* Signals carry the classification and ids, never the text: the text stays in
  PostgreSQL (`inbound_events.payload`), so workflow histories hold no reply text.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, tzinfo
from email.utils import parseaddr
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, Field, field_validator
from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from db.events import append_event
from db.session import SessionFactory
from db.tables import (
    Delivery,
    Enrollment,
    Identity,
    InboundEvent,
    Person,
    SequenceVersion,
    Suppression,
)
from models.activities import EnrollmentRef
from models.durations import parse_duration
from models.enrollment import ControlSignal, InboundSignal, OutOfOfficeSignal, SequenceRef
from services.classify import ReplyClassifier
from services.identities import lookup_value

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

    @field_validator("references", mode="before")
    @classmethod
    def _split_references(cls, value: Any) -> Any:
        """Accept the raw header too: `References: <a@x> <b@y>` as one string."""
        if isinstance(value, str):
            return [part for part in re.split(r"[\s,]+", value) if part]
        return value


def _message_id_forms(raw: list[str | None]) -> list[str]:
    """Message-IDs as given and in their `<...>` form (providers send either)."""
    out: list[str] = []
    for value in raw:
        v = (value or "").strip()
        if not v:
            continue
        bare = v.strip("<>").strip()
        if bare:
            out += [v, f"<{bare}>", bare]
    return list(dict.fromkeys(out))


def _not_found(err: RPCError) -> bool:
    """The workflow is gone (finished, or never started): nothing to change there."""
    return err.status == RPCStatusCode.NOT_FOUND


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
        trust_thread_only: bool = False,
    ) -> None:
        self.session_factory = session_factory
        self.client = client
        self.classifier = classifier
        self.ooo_default = parse_duration(out_of_office_default)
        self.trust_thread_only = trust_thread_only

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
            async with self.session_factory() as session:
                earlier = (
                    await session.execute(
                        select(InboundEvent.id, InboundEvent.status).where(
                            InboundEvent.channel == channel, InboundEvent.provider_event_id == payload.event_id
                        )
                    )
                ).one()
            if earlier.status != "received":
                return InboundResult(status="duplicate")
            # An earlier delivery of this event was not finished (Temporal was unreachable, the
            # process died): finish it now. Every step below is idempotent (the workflows ignore
            # an event id they have seen, events have dedup keys, suppressions are looked up first).
            new_id = int(earlier.id)

        person_id, identity_id, by_thread = await self._resolve(channel, payload)
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

        if by_thread and payload.type != "bounce" and not self.trust_thread_only:
            # Matched by our Message-ID only, From is not this person: shown, never acted on.
            data = {"type": payload.type, "classification": label, "why": "matched by thread only; From is not theirs"}
            await self._log(active, person_id, "reply_unverified", channel, signal_id, data)
            status = "unverified"
        elif payload.type in ("complaint",) or label == "unsubscribe":
            reason = "complaint" if payload.type == "complaint" else "unsubscribe reply"
            await suppress_person(self.session_factory, person_id, reason, f"{channel}:{payload.event_id}")
            await self._signal_all(active, "unsubscribe", ControlSignal(reason=reason, source=channel))
            await self._log(active, person_id, "unsubscribed", channel, signal_id, {"via": reason})
            status = "unsubscribed"
        elif payload.type == "bounce":
            await self._suppress_identity(identity_id, person_id, signal_id)
            await self._log(active, person_id, "bounced", channel, signal_id, {"via": "webhook"})
            status = "suppressed_identity"
        elif label == "out_of_office":
            until = await self._return_time(person_id, return_date) if return_date else None
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
                occurred_at=payload.occurred_at or received,
                classification=label,
                inbound_event_id=new_id,
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
    async def _resolve(self, channel: str, payload: InboundPayload) -> tuple[int | None, int | None, bool]:
        """(person id, identity id, matched by thread only) of the sender; (None, None, False) if unknown.

        The `from` value is looked up in the identity graph (an email `From:` header such as
        `Ada <ada@x.com>` is reduced to its address); for email, In-Reply-To and References
        are then matched against the Message-IDs of our own deliveries: such a match has a
        From that is none of the person's identities (else the lookup would have found it).
        """
        sender = payload.from_
        if channel == "email":
            sender = parseaddr(sender)[1] or sender
        async with self.session_factory() as session:
            for ident_channel in ["x", "x_handle"] if channel == "x" else [channel]:
                try:
                    canonical = lookup_value(ident_channel, sender)
                except ValueError:
                    continue
                found = (
                    await session.execute(
                        select(Identity.person_id, Identity.id).where(
                            Identity.channel == ident_channel, Identity.value == canonical
                        )
                    )
                ).first()
                if found is not None:
                    return int(found.person_id), int(found.id), False
            if channel == "email":
                ids = _message_id_forms([payload.in_reply_to, *payload.references])
                if ids:
                    row = (
                        await session.execute(
                            select(Enrollment.person_id, Delivery.identity_id, Delivery.channel)
                            .join(Delivery, Delivery.enrollment_id == Enrollment.id)
                            .where(Delivery.message_id.in_(ids))
                            .order_by(Delivery.id.desc())
                            .limit(1)
                        )
                    ).first()
                    if row is not None:
                        if row.identity_id is not None:
                            return int(row.person_id), int(row.identity_id), True
                        # The ledger row does not name the address: the person's only one on that
                        # channel is it; with several we cannot tell, so no identity is named.
                        targets = (
                            (
                                await session.execute(
                                    select(Identity.id).where(
                                        Identity.person_id == row.person_id, Identity.channel == row.channel
                                    )
                                )
                            )
                            .scalars()
                            .all()
                        )
                        return int(row.person_id), (int(targets[0]) if len(targets) == 1 else None), True
        return None, None, False

    async def _return_time(self, person_id: int, day: date) -> datetime:
        """09:00 in the person's own time zone on the day they are back."""
        async with self.session_factory() as session:
            name = (await session.execute(select(Person.timezone).where(Person.id == person_id))).scalar_one_or_none()
        try:
            tz: tzinfo = ZoneInfo(name or "UTC")
        except (ZoneInfoNotFoundError, ValueError):
            tz = UTC
        return datetime.combine(day, time(9, 0), tzinfo=tz).astimezone(UTC)

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
        await self._signal_ids([a.workflow_id for a in active], name, arg)

    async def _signal_ids(self, workflow_ids: list[str], name: str, arg: BaseModel) -> None:
        """Signal every workflow; one that has finished is skipped, any other error raises.

        Raising matters: the inbound event then stays `received`, the webhook answers 503,
        and the provider's retry finishes the job instead of being taken for a duplicate.
        """

        async def one(wid: str) -> None:
            try:
                await self.client.get_workflow_handle(wid).signal(name, arg)
            except RPCError as err:
                if not _not_found(err):
                    raise
                log.info("signal %s to %s not delivered: %s", name, wid, err)

        await asyncio.gather(*(one(w) for w in workflow_ids))

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

    async def _suppress_identity(self, identity_id: int | None, person_id: int, source: str) -> None:
        """A bounce suppresses the identity that bounced (the person when it is not known); idempotent."""
        async with self.session_factory() as session, session.begin():
            await session.execute(select(Person.id).where(Person.id == person_id).with_for_update())
            target = (
                Suppression.identity_id == identity_id
                if identity_id is not None
                else Suppression.person_id == person_id
            )
            query = select(Suppression.id).where(target, Suppression.reason == "bounce")
            exists = (await session.execute(query)).first()
            if exists is None:
                if identity_id is not None:
                    session.add(Suppression(identity_id=identity_id, reason="bounce", source=source))
                else:
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
        sig = ControlSignal(reason=f"colleague (person {person_id}) replied", source="company-hold")
        await self._signal_ids(ids, "pause", sig)


async def suppress_person(session_factory: SessionFactory, person_id: int, reason: str, source: str) -> bool:
    """Suppress a whole person (idempotent); False when the person does not exist.

    A person who no longer exists (deleted after the link was sent) has nothing to suppress.
    """
    async with session_factory() as session, session.begin():
        found = (await session.execute(select(Person.id).where(Person.id == person_id).with_for_update())).first()
        if found is None:
            return False
        exists = (
            await session.execute(
                select(Suppression.id).where(Suppression.person_id == person_id, Suppression.reason == reason)
            )
        ).first()
        if not exists:
            session.add(Suppression(person_id=person_id, reason=reason, source=source))
    return True


__all__ = ["InboundProcessor", "InboundPayload", "InboundResult", "suppress_person", "CHANNELS"]
