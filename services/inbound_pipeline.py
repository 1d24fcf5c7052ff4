"""The one inbound pipeline: from a normalized inbound event to signals on every affected enrollment.

Every source feeds it (the signed webhook, the mailbox watchers, the provider adapters),
so its rules are written once and read in one place:

* Deduplicated by (channel, event id) in `inbound_events`: a repeat does nothing. Mail
  read from a mailbox uses its Message-ID, so a message read twice has an effect once.
* The sender is resolved to a person through the identity graph and, for email, through
  In-Reply-To / References against our own Message-IDs; bounces and complaints through
  the Message-IDs of our mail they return. Every active enrollment of that person is
  signalled, so a reply on X branches the email sequence too. Unknown senders and
  unrecognised mail are recorded, not errors.
* Replies are classified first: out-of-office (by text or by auto-reply headers) is not a
  reply (the next step moves after the return date), unsubscribe intent suppresses and
  stops, and positive / negative / neutral are kept for statistics.
* Consent rules: unsubscribes (link or reply), complaints suppress the whole person: one
  "stop" stops every sequence on every channel. A permanent bounce marks our delivery
  bounced and suppresses only the identity that bounced; a temporary one is recorded only.
  The permanent bounce counts for the sender's circuit breaker (`sender_breaker`) as a
  refusal during the send does: over the bounce-rate threshold, the sender is paused.
* A reply matched only through In-Reply-To/References, whose From is not one of that
  person's identities (a forwarded mail, or someone who got hold of a Message-ID), is
  recorded (`reply_unverified`) and changes nothing: no stop, unsubscribe, complaint,
  out-of-office delay or company hold, unless `INBOUND_TRUST_THREAD_ONLY` allows it.
  Bounces and reports (DSN, ARF) are exempt: a mailer-daemon's report never comes from
  the person; they are matched through the Message-ID of our mail they return.
* Signals carry the classification and ids, never the text: the text stays in
  PostgreSQL (`inbound_events.payload`), so workflow histories hold no reply text.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, tzinfo
from email.utils import parseaddr
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel
from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from db.events import append_event
from db.session import SessionFactory
from db.tables import (
    Delivery,
    Enrollment,
    Identity,
    Person,
    SequenceVersion,
    Suppression,
)
from db.tables import (
    InboundEvent as InboundEventRow,
)
from models.activities import EnrollmentRef
from models.durations import parse_duration
from models.enrollment import ControlSignal, InboundSignal, OutOfOfficeSignal, SequenceRef
from models.inbound import InboundEvent
from models.outcomes import LIVE_ENROLLMENT, EnrollmentStatus, EventType, InboundStatus
from services.classify import ReplyClassifier
from services.identities import lookup_value
from services.sender_breaker import BreakerConfig, record_late_bounce
from services.tokens import TokenError, read_token

log = logging.getLogger("sequencer.inbound")

CHANNELS = ("email", "x", "linkedin", "xmtp")
SIGNAL_FOR = {
    "reply": "replied",
    "connection_accepted": "connection_accepted",
    "followed_back": "followed_back",
    "replied_to_note": "replied_to_note",
}


def _message_id_forms(raw: Sequence[str | None]) -> list[str]:
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


def _diagnostic(event: InboundEvent) -> dict[str, Any]:
    """The bounce's status code and diagnostic text, for the event log (no message text)."""
    return {k: str(event.detail[k])[:500] for k in ("status", "diagnostic", "action") if event.detail.get(k)}


def _not_found(err: RPCError) -> bool:
    """The workflow is gone (finished, or never started): nothing to change there."""
    return err.status == RPCStatusCode.NOT_FOUND


@dataclass
class InboundResult:
    """What processing did (returned as the webhook's JSON)."""

    status: InboundStatus
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


@dataclass
class Resolved:
    """Who an inbound event is about: the person, the identity, and our delivery when known."""

    person_id: int | None = None
    identity_id: int | None = None
    delivery_id: int | None = None
    #: Matched through In-Reply-To/References only: the From is none of the person's identities.
    by_thread: bool = False


class InboundPipeline:
    """Applies inbound events from every source: records, consent rules and workflow signals.

    `client` may be None while Temporal is unreachable: consent rules (suppressions) still
    apply and signals are skipped (the send-time gate reads the suppressions); `process`
    refuses in that case, so the source retries later instead of losing the signal.
    """

    def __init__(
        self,
        session_factory: SessionFactory,
        client: Client | None,
        classifier: ReplyClassifier,
        *,
        out_of_office_default: str = "7d",
        trust_thread_only: bool = False,
        link_keys: Sequence[str] = (),
        breaker: BreakerConfig | None = None,
    ) -> None:
        self.session_factory = session_factory
        self.client = client
        self.classifier = classifier
        self.ooo_default = parse_duration(out_of_office_default)
        self.trust_thread_only = trust_thread_only
        #: LINK_SECRET's keys: they read the token of a List-Unsubscribe mailto request.
        self.link_keys = list(link_keys)
        #: The sender circuit breaker's thresholds (SENDER_* settings): later bounces count too.
        self.breaker = breaker or BreakerConfig()

    async def process(self, event: InboundEvent) -> InboundResult:
        """Handle one event (idempotent per channel and event id)."""
        if self.client is None:
            raise RuntimeError("Temporal is not reachable: inbound events cannot signal enrollments now")
        received = datetime.now(UTC)
        row_id = await self._claim(event)
        if row_id is None:
            return InboundResult(status=InboundStatus.DUPLICATE)
        channel = event.channel
        if event.type == "unknown":
            status = InboundStatus.MALFORMED if event.detail.get("malformed") else InboundStatus.UNRECOGNIZED
            await self._mark(row_id, status, None, None)
            log.info("inbound %s/%s recorded as %s: %s", channel, event.event_id, status, event.detail.get("reason"))
            return InboundResult(status=status)

        requested = self._unsubscribe_request(event)
        who = Resolved(requested) if requested is not None else await self._resolve(event)
        person_id = who.person_id
        if person_id is None:
            await self._mark(row_id, InboundStatus.UNKNOWN_SENDER, None, None)
            log.info("inbound %s/%s from unknown sender %r", channel, event.event_id, event.sender)
            return InboundResult(status=InboundStatus.UNKNOWN_SENDER)

        label: str | None = None
        return_date = None
        if event.type in ("reply", "auto_reply") and event.text:
            verdict = self.classifier.classify(event.text, received_at=event.occurred_at or received)
            label, return_date = verdict.label, verdict.return_date
        if event.type == "auto_reply":
            label = "out_of_office"  # an auto-responder is never a reply, whatever its text says
        if event.detail.get("unsubscribe_token"):
            label = "unsubscribe"  # sent through our List-Unsubscribe mailto: a stop, whatever the body says
        active = await self._active_enrollments(person_id)
        signal_id = f"{channel}:{event.event_id}"

        if who.by_thread and event.type != "bounce" and not self.trust_thread_only:
            # Matched by our Message-ID only, From is not this person: shown, never acted on.
            data = {"type": event.type, "classification": label, "why": "matched by thread only; From is not theirs"}
            await self._log(active, person_id, EventType.REPLY_UNVERIFIED, channel, signal_id, data)
            status = InboundStatus.UNVERIFIED
        elif event.type == "complaint" or label == "unsubscribe":
            reason = "complaint" if event.type == "complaint" else "unsubscribe reply"
            via = None
            if event.detail.get("unsubscribe_token"):
                reason, via = "unsubscribe", "mailto"  # the List-Unsubscribe mailto, as the link: "unsubscribe"
            await self.unsubscribe(
                person_id, reason=reason, source=signal_id, event_key=signal_id, via=via, channel=channel, active=active
            )
            status = InboundStatus.UNSUBSCRIBED
        elif event.type == "bounce" and not event.permanent:
            await self._log(
                active,
                person_id,
                EventType.SOFT_BOUNCED,
                channel,
                signal_id,
                {"via": event.source, "delivery_id": who.delivery_id, **_diagnostic(event)},
            )
            status = InboundStatus.SOFT_BOUNCE
        elif event.type == "bounce":
            await self._mark_delivery_bounced(who.delivery_id, event)
            await self._suppress_identity(who.identity_id, person_id, signal_id)
            await self._log(
                active,
                person_id,
                EventType.BOUNCED,
                channel,
                signal_id,
                {"via": event.source, "delivery_id": who.delivery_id, **_diagnostic(event)},
            )
            status = InboundStatus.SUPPRESSED_IDENTITY
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
                EventType.OUT_OF_OFFICE,
                channel,
                signal_id,
                {"until": until.isoformat() if until else None},
            )
            status = InboundStatus.RESCHEDULED
        else:
            kind = SIGNAL_FOR[event.type]
            sig_in = InboundSignal(
                event_id=signal_id,
                channel=channel,
                occurred_at=event.occurred_at or received,
                classification=label,
                inbound_event_id=row_id,
            )
            await self._signal_all(active, kind, sig_in)
            event_type = EventType.REPLIED if event.type in ("reply", "replied_to_note") else EventType(event.type)
            await self._log(active, person_id, event_type, channel, signal_id, {"classification": label})
            if label == "positive":
                await self._log(active, person_id, EventType.POSITIVE_REPLY, channel, signal_id, {})
            if event.type == "reply":
                await self._hold_company(person_id, active)
            status = InboundStatus.SIGNALLED
        await self._mark(row_id, status, person_id, label)
        return InboundResult(status=status, person_id=person_id, enrollments=len(active), classification=label)

    async def unsubscribe(
        self,
        person_id: int,
        *,
        reason: str,
        source: str,
        event_key: str,
        signal_reason: str | None = None,
        via: str | None = None,
        channel: str | None = None,
        active: list[ActiveEnrollment] | None = None,
        best_effort: bool = False,
        person_event_key: str | None = None,
    ) -> bool:
        """The consent rule for every way a person says stop (link, reply, complaint).

        Suppresses the whole person, signals `unsubscribe` to each active enrollment and
        appends one `unsubscribed` event per enrollment (or one for the person). True when a
        new suppression was written. Without a Temporal client the suppression still holds
        (every send checks it) and the signals are skipped. `reason`/`source` are stored on
        the suppression; `event_key` deduplicates the events (`person_event_key` the one
        written when no enrollment is active). Events are written every time, deduplicated
        by key: a suppression that committed before a crash still gets its events on a retry.
        False when the person does not exist (nothing to suppress).
        """
        known = await suppress_person(self.session_factory, person_id, reason, source)
        if not known:
            return False
        if active is None:
            active = await self._active_enrollments(person_id)
        signal = ControlSignal(reason=signal_reason or reason, source=channel or source)
        await self._signal_all(active, "unsubscribe", signal, best_effort=best_effort)
        await self._log(
            active,
            person_id,
            EventType.UNSUBSCRIBED,
            channel,
            event_key,
            {"via": via or reason},
            person_key=person_event_key,
        )
        return True

    async def unsubscribe_by_link(self, person_id: int) -> bool:
        """The unsubscribe link or RFC 8058 one-click POST: the suppression holds even when
        the signals cannot be delivered now (each send checks it); one event per person."""
        return await self.unsubscribe(
            person_id,
            reason="unsubscribe",
            source="link",
            event_key="link",
            signal_reason="unsubscribe link",
            via="link",
            best_effort=True,
            person_event_key=f"{EventType.UNSUBSCRIBED}:link:{person_id}",
        )

    # ------------------------------------------------------------------ helpers
    def _unsubscribe_request(self, event: InboundEvent) -> int | None:
        """The person named by the token of a List-Unsubscribe mailto request (None: no valid token).

        The token is the one the unsubscribe link carries (encrypted and authenticated with
        LINK_SECRET): it names the person whatever address the request comes from. Without
        a valid one the mail is matched by its From like any reply, and still unsubscribes.
        """
        token = event.detail.get("unsubscribe_token")
        if not token or not self.link_keys:
            return None
        try:
            return int(read_token(self.link_keys, "unsubscribe", str(token))["p"])
        except (TokenError, KeyError, TypeError, ValueError) as err:
            log.info("inbound %s/%s: unsubscribe token not valid (%s)", event.channel, event.event_id, err)
            return None

    async def _claim(self, event: InboundEvent) -> int | None:
        """The event's `inbound_events` row id, or None when it was already handled.

        A row left `received` by an earlier attempt that did not finish (Temporal was
        unreachable, the process died) is taken over: every step after this one is
        idempotent (the workflows ignore an event id they have seen, events have dedup
        keys, suppressions are looked up first).
        """
        async with self.session_factory() as session, session.begin():
            new_id = (
                await session.execute(
                    insert(InboundEventRow)
                    .values(
                        channel=event.channel,
                        provider_event_id=event.event_id,
                        type=event.type,
                        from_value=event.sender[:512],
                        payload=event.model_dump(mode="json", exclude_defaults=True),
                        status=InboundStatus.RECEIVED,
                    )
                    .on_conflict_do_nothing(constraint="uq_inbound_events_provider_id")
                    .returning(InboundEventRow.id)
                )
            ).scalar_one_or_none()
        if new_id is not None:
            return int(new_id)
        async with self.session_factory() as session:
            earlier = (
                await session.execute(
                    select(InboundEventRow.id, InboundEventRow.status).where(
                        InboundEventRow.channel == event.channel, InboundEventRow.provider_event_id == event.event_id
                    )
                )
            ).one()
        return int(earlier.id) if earlier.status == InboundStatus.RECEIVED else None

    async def _resolve(self, event: InboundEvent) -> Resolved:
        """Who the event is about, or an empty `Resolved` for an unknown sender.

        Bounces and complaints are matched first through the Message-IDs of our mail they
        return (their `From` is the reporting system), then through the recipient they
        name. Everything else: the sender is looked up in the identity graph (an email
        `From:` header such as `Ada <ada@x.com>` is reduced to its address); for email,
        In-Reply-To and References are then matched against our deliveries' Message-IDs.
        """
        channel = event.channel
        async with self.session_factory() as session:
            if event.type in ("bounce", "complaint"):
                found = await self._by_message_ids(session, event.about_message_ids)
                if found.person_id is not None:
                    return found
                for address in event.about_recipients:
                    found = await self._by_identity(session, channel, address)
                    if found.person_id is not None:
                        return found
            found = await self._by_identity(session, channel, event.sender)
            if found.person_id is not None:
                return found
            if channel == "email":
                found = await self._by_message_ids(session, [event.in_reply_to, *event.references])
                found.by_thread = found.person_id is not None
                return found
        return Resolved()

    async def _by_identity(self, session: AsyncSession, channel: str, value: str) -> Resolved:
        """The identity with this value on this channel (X: by user id, then by handle)."""
        if channel == "email":
            value = parseaddr(value)[1] or value
        for ident_channel in ["x", "x_handle"] if channel == "x" else [channel]:
            try:
                canonical = lookup_value(ident_channel, value)
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
                return Resolved(int(found.person_id), int(found.id))
        return Resolved()

    async def _by_message_ids(self, session: AsyncSession, raw_ids: Sequence[str | None]) -> Resolved:
        """Our latest delivery carrying one of these Message-IDs, its person and identity."""
        ids = _message_id_forms(raw_ids)
        if not ids:
            return Resolved()
        row = (
            await session.execute(
                select(Enrollment.person_id, Delivery.id, Delivery.identity_id, Delivery.channel)
                .join(Delivery, Delivery.enrollment_id == Enrollment.id)
                .where(Delivery.message_id.in_(ids))
                .order_by(Delivery.id.desc())
                .limit(1)
            )
        ).first()
        if row is None:
            return Resolved()
        if row.identity_id is not None:
            return Resolved(int(row.person_id), int(row.identity_id), int(row.id))
        # The ledger row does not name the address: the person's only one on that channel
        # is it; with several we cannot tell, so no identity is named.
        targets = (
            (
                await session.execute(
                    select(Identity.id).where(Identity.person_id == row.person_id, Identity.channel == row.channel)
                )
            )
            .scalars()
            .all()
        )
        return Resolved(int(row.person_id), int(targets[0]) if len(targets) == 1 else None, int(row.id))

    async def _mark_delivery_bounced(self, delivery_id: int | None, event: InboundEvent) -> None:
        """Our delivery that bounced: sent -> bounced (compare-and-set; any other state stays),
        and its sender's bounce rate checked (a repeat of the report counts once)."""
        if delivery_id is None:
            return
        reason = f"bounce: {event.detail.get('status') or ''} {event.detail.get('diagnostic') or ''}".strip()
        async with self.session_factory() as session, session.begin():
            await record_late_bounce(session, delivery_id, reason, self.breaker, datetime.now(UTC))

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
                    .where(Enrollment.person_id == person_id, Enrollment.status.in_(LIVE_ENROLLMENT))
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

    async def _signal_all(
        self, active: list[ActiveEnrollment], name: str, arg: BaseModel, *, best_effort: bool = False
    ) -> None:
        await self._signal_ids([a.workflow_id for a in active], name, arg, best_effort=best_effort)

    async def _signal_ids(
        self, workflow_ids: list[str], name: str, arg: BaseModel, *, best_effort: bool = False
    ) -> None:
        """Signal every workflow; one that has finished is skipped, any other error raises.

        Raising matters: the inbound event then stays `received`, the webhook answers 503,
        and the provider's retry finishes the job instead of being taken for a duplicate.
        `best_effort` (the unsubscribe link, whose suppression already holds) logs instead.
        """
        client = self.client
        if client is None:
            return

        async def one(wid: str) -> None:
            try:
                await client.get_workflow_handle(wid).signal(name, arg)
            except RPCError as err:
                if not _not_found(err) and not best_effort:
                    raise
                log.info("signal %s to %s not delivered: %s", name, wid, err)
            except Exception as err:
                if not best_effort:
                    raise
                log.info("signal %s to %s not delivered: %s", name, wid, err)

        await asyncio.gather(*(one(w) for w in workflow_ids))

    async def _log(
        self,
        active: list[ActiveEnrollment],
        person_id: int,
        type_: EventType,
        channel: str | None,
        event_key: str,
        data: dict[str, Any],
        *,
        person_key: str | None = None,
    ) -> None:
        async with self.session_factory() as session, session.begin():
            if not active:
                await append_event(
                    session,
                    type_=type_,
                    person_id=person_id,
                    channel=channel,
                    dedup_key=person_key or f"{type_}:{event_key}",
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

    async def _mark(self, row_id: int, status: InboundStatus, person_id: int | None, label: str | None) -> None:
        async with self.session_factory() as session, session.begin():
            await session.execute(
                update(InboundEventRow)
                .where(InboundEventRow.id == row_id)
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
                        Enrollment.status == EnrollmentStatus.ACTIVE,
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


__all__ = ["CHANNELS", "InboundPipeline", "InboundResult", "suppress_person"]
