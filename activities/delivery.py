"""Sending one step's action exactly once: governor slot, ledger, gate, render, channel.

The order inside `deliver` is what makes "no double sends, ever" true:

1. Claim the ledger row keyed by (enrollment, step, attempt of that step), as this
   activity attempt (`owner`, a token of run, activity id and attempt number). A row that
   already reached an outcome is returned as it is: a retry never sends again. A `claimed`
   row held by an older attempt (a stalled or dead worker) is taken over; a newer
   attempt's row is not.
2. The suppression/consent gate, right before the provider call. An X step for a person
   known only by handle first resolves it to the numeric user id (a read at X, never a
   send) and stores that id as the person's `x` identity, so it is looked up once and
   inbound events from the id find the person; the gate is applied to both.
3. Render the template (a broken template is a permanent failure, never a half-send).
4. The channel takes its connection, then calls back right before the irreversible write
   (the message body after DATA, the POST): the row goes `claimed → sending` there, and
   only if this attempt still owns it; otherwise the channel drops the connection unwritten.
   If the process dies after that commit, the retry finds `sending` and records the
   delivery as `uncertain`: it may have gone out, so it is never re-sent.
5. Record the outcome and append events.

Every transition is a compare-and-set on the status it expects and on the owner: an attempt
that lost the row (to a newer attempt, or to `give_up_delivery`) records nothing and sends
nothing. Transient errors put the row back to `claimed` and raise a retryable
ApplicationError (with `next_retry_delay` from the provider's reset header); permanent ones
mark it `failed` or `bounced` (a bounce also suppresses that identity) and return normally
so the workflow can take the failure path.
"""

from __future__ import annotations

import asyncio
import inspect
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, nullcontext, suppress
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, NamedTuple

from pydantic import SecretStr
from sqlalchemy import CTE, FromClause, Integer, Row, Select, bindparam, func, literal, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased
from sqlalchemy.sql.dml import Update
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.channels.base import (
    ChannelClient,
    DkimKey,
    OutboundMessage,
    PermanentChannelError,
    SendAborted,
    SenderConfigError,
    TransientChannelError,
    UncertainChannelError,
    make_message_id,
)
from activities.channels.email_compose import text_to_html
from activities.channels.x import XUserResolver
from activities.governor import NoSlotError, SendGovernor, TimelineEndedError
from activities.records import (
    event_shape,
    event_write_params,
    event_writes,
    finish_params,
    finish_writes,
    write_event,
    write_finish,
)
from activities.send_gate import activity_now, check_send_gate
from db.events import append_event, event_insert, event_params
from db.session import SessionFactory, autocommit
from db.statements import insert_if, params, table_of
from db.tables import Delivery, Identity, Person, SenderAccount, SequenceVersion, Suppression
from models.activities import (
    DeliverInput,
    DeliverOutput,
    FinishInput,
    RecordEventInput,
    ReserveSlotInput,
    ReserveSlotOutput,
    SendStepInput,
    SendStepOutput,
)
from models.identity_kinds import kinds_for_channel, stand_in_kind, target_kind
from models.outcomes import DELIVERY_FINAL, DELIVERY_IN_FLIGHT, DeliveryStatus, EventType
from models.sequence import MESSAGE_ACTIONS, Action, Channel
from services import sender_breaker
from services.click_tracking import rewrite_html, rewrite_text
from services.identities import IdentityOwnedError, attach_identity
from services.redact import redact
from services.secret_box import SecretBox, SecretKeyError
from services.sender_breaker import BreakerConfig, describe, is_paused
from services.templating import person_context, render_step
from services.tokens import make_token


@dataclass
class _Extras:
    """What `send_step` writes with its send: the step's start (in the claim's transaction)
    and the enrollment's end (in the outcome's, when the outcome ends the walk)."""

    started: RecordEventInput | None = None
    finish: FinishInput | None = None
    started_done: bool = False
    finish_done: bool = False


#: Set by `send_step` for its own task (each activity runs in a task of its own).
_EXTRAS: ContextVar[_Extras | None] = ContextVar("send_step_extras", default=None)

#: When this task's `deliver` attempt began: monotonic, and on Temporal's clock (see `_accepted_at`).
_ATTEMPT_T0: ContextVar[tuple[float, datetime] | None] = ContextVar("deliver_attempt_t0", default=None)


def _accepted_at() -> datetime:
    """Now, on Temporal's clock: the attempt's start plus the time spent since.

    A `sent` event carries when the provider accepted the message, not when the step was
    planned (`inp.now`, which a retry or a pacing delay leaves behind). Measured from the
    attempt's start on the server's clock (`activity_now`: for a local activity, whose times
    are the worker's, no earlier than the workflow's time that asked for it), so that it
    agrees with the workflow's timers, also under a time-skipping test server; outside an
    activity, the wall clock.
    """
    began = _ATTEMPT_T0.get()
    if began is None or not activity.in_activity():
        return datetime.now(UTC)
    t0, at = began
    return at.astimezone(UTC) + timedelta(seconds=time.monotonic() - t0)


#: Outcomes after which a step whose only edge is END ends the enrollment as completed.
ENDS_THE_WALK = {DeliveryStatus.SENT, DeliveryStatus.UNCERTAIN, DeliveryStatus.SKIPPED}
#: `send_step` sends at once when its slot is at most this far off (it waits that long
#: first); a later slot is the workflow's to wait for, on a durable timer.
SEND_AT_ONCE = timedelta(seconds=2)
#: When a heartbeating send first beats (seconds after it starts).
FIRST_BEAT = 1.0


@dataclass
class DeliveryConfig:
    """What delivery needs from settings (kept explicit so tests can build it)."""

    public_base_url: str
    link_secret: str
    postal_address: str
    person_daily_touch_cap: int = 1
    #: UNSUBSCRIBE_MAILTO: an address offered as a `mailto:` beside the https link (empty: none).
    unsubscribe_mailto: str = ""
    #: The sender circuit breaker's thresholds and cool-down (SENDER_BREAKER_* settings).
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    #: SEND_LATE_GRACE_SECONDS: a send later than this after its slot asks for a new one.
    send_late_grace_seconds: float = 120.0
    #: SECRETS_KEY's box: opens senders' DKIM keys right before a send (None: no key configured).
    secrets: SecretBox | None = None


def _gate(person: Person, target: Identity, suppressions: list[Suppression]) -> str | None:
    """Why this send must not happen (a suppression of the person or target, denied consent), or None."""
    for sup in suppressions:
        if sup.person_id == person.id or sup.identity_id == target.id:
            scope = "person" if sup.person_id == person.id else target.value
            return f"suppressed ({scope}): {sup.reason}"
    if target.consent == "denied":
        return f"consent denied for {target.value}"
    return None


class _Recipient(NamedTuple):
    """What a send needs from the database, read with its claim."""

    person: Person | None
    identities: list[Identity]
    sender: SenderAccount | None
    suppressions: list[Suppression]

    @classmethod
    def of(cls, rows: Sequence[Row[Any]]) -> _Recipient:
        """From `_recipient_query`'s rows (their last four columns): one per identity and suppression."""
        found = [tuple(r)[-4:] for r in rows]
        person, sender = (found[0][0], found[0][1]) if found else (None, None)
        identities = list(dict.fromkeys(r[2] for r in found if r[2] is not None))
        suppressions = list(dict.fromkeys(r[3] for r in found if r[3] is not None))
        return cls(person, identities, sender, suppressions)


class _ClaimRow(NamedTuple):
    """The ledger row's columns a claim sets (parameters `d_` + column), in one place."""

    idempotency_key: str
    enrollment_id: int
    step_id: str
    attempt: int
    channel: str
    action: str
    sender_id: int | None
    variant: str | None
    status: str
    owner: str
    owner_attempt: int


_CLAIM_COLUMNS = _ClaimRow._fields


def _claimed() -> CTE:
    """The ledger row `claimed` (INSERT ... RETURNING it), unless the key has one already."""
    claim = insert_if(Delivery, _CLAIM_COLUMNS, None, "d_").on_conflict_do_nothing(index_elements=["idempotency_key"])
    return claim.returning(*table_of(Delivery).c).cte("claimed")


def _claim_params(inp: DeliverInput, key: str, channel: str, me: _Owner) -> dict[str, Any]:
    row = _ClaimRow(
        idempotency_key=key,
        enrollment_id=inp.ref.enrollment_id,
        step_id=inp.step.id,
        attempt=inp.attempt,
        channel=channel,
        action=str(inp.step.action),
        sender_id=inp.sender_id,
        variant=inp.variant,
        status=DeliveryStatus.CLAIMED,
        owner=me.token,
        owner_attempt=me.attempt,
    )
    return params("d_", row._asdict())


def _recipient_query(base: FromClause, *first: Any) -> Select[Any]:
    """One read of the person, their identities, the sender and the suppressions, joined to `base`.

    `base` is the claim (no row: nothing read) or a one-row subquery; `first` entities come
    before the four. A suppression applies if it names the person or one of their identities.
    Parameters: `_recipient_params`.
    """
    return (
        select(*first, Person, SenderAccount, Identity, Suppression)
        .select_from(base)
        .outerjoin(Person, Person.id == bindparam("r_person"))
        .outerjoin(SenderAccount, SenderAccount.id == bindparam("r_sender"))
        .outerjoin(Identity, Identity.person_id == Person.id)
        .outerjoin(Suppression, or_(Suppression.person_id == Person.id, Suppression.identity_id == Identity.id))
        .order_by(Identity.id, Suppression.id)
    )


def _recipient_params(inp: DeliverInput) -> dict[str, Any]:
    return {"r_person": inp.ref.person_id, "r_sender": inp.sender_id}


@lru_cache(maxsize=8)
def _claim_statement(started: tuple[bool, bool, bool] | None) -> Select[Any]:
    """The claim with the reads, and the step's start of that shape (`event_shape`) if any."""
    claimed = _claimed()
    stmt = _recipient_query(claimed, aliased(Delivery, claimed))
    for i, write in enumerate(event_writes(*started) if started is not None else []):
        stmt = stmt.add_cte(write.cte(f"started_{i}"))
    return stmt


_CLAIM = select(aliased(Delivery, _claimed()))
_RECIPIENT = _recipient_query(select(literal(1)).subquery())


def delivery_key(enrollment_id: int, step_id: str, attempt: int) -> str:
    """The ledger's idempotency key for one visit of one step."""
    return f"{enrollment_id}:{step_id}:{attempt}"


class DeliveryActivities:
    """Governor slots and exactly-once delivery."""

    def __init__(
        self,
        session_factory: SessionFactory,
        governor: SendGovernor,
        channels: Mapping[str, ChannelClient],
        config: DeliveryConfig,
        fault: Callable[[str], Any] | None = None,
    ) -> None:
        self.session_factory = session_factory
        self.governor = governor
        self.channels = channels
        self.config = config
        self._fault = fault or (lambda point: None)
        self._clicks: dict[int, bool | None] = {}  # click tracking per sequence version (immutable)

    # ------------------------------------------------------------------ slots
    @activity.defn(name="reserve_send_slot")
    async def reserve_send_slot(self, inp: ReserveSlotInput) -> ReserveSlotOutput:
        """Ask the channel's governor for a send time (idempotent per round)."""
        return await self._reserve(inp)

    async def _reserve(self, inp: ReserveSlotInput) -> ReserveSlotOutput:
        key = delivery_key(inp.ref.enrollment_id, inp.step_id, inp.attempt)
        try:
            reservation = await self.governor.reserve(
                delivery_key=f"{key}:r{inp.round}",
                channel=inp.channel,
                person_id=inp.ref.person_id,
                now=activity_now(inp.now),
                not_before=inp.not_before,
                preferred_sender_id=inp.preferred_sender_id,
                allowed_senders=inp.allowed_senders or None,
                counts_as_touch=Action(inp.action) in MESSAGE_ACTIONS,
                person_daily_cap=self.config.person_daily_touch_cap,
                send_window=inp.send_window,
                timeline=inp.timeline,
                timezone=inp.timezone,
                response=inp.response,
                releases=[f"{key}:r{r}" for r in range(inp.round)],  # the rounds this one replaces
            )
        except TimelineEndedError as err:
            return ReserveSlotOutput(sender_id=None, slot_at=inp.not_before, reason=str(err), ended=True)
        except NoSlotError as err:
            # A sender whose caps allow nothing (per_day 0, say) is a configuration to fix, not a
            # lead to drop: ask again hourly, with the reason in the Web UI's pending activity.
            raise ApplicationError(
                f"no send slot within a year: {err} (check the sender's caps with `senders add`)",
                type="NoSendSlot",
                next_retry_delay=timedelta(hours=1),
            ) from err
        if reservation.sender_id is None:
            await self._wait_for_paused_senders(inp)
        # deferred: the governor moved the slot past the asked time, and says why (a slot at
        # "now" is a few milliseconds past the workflow's time and is no deferral)
        if reservation.sender_id is not None and reservation.reason is not None:
            async with self.session_factory() as session, session.begin():
                await append_event(
                    session,
                    type_=EventType.DEFERRED_UNTIL,
                    ref=inp.ref,
                    step_id=inp.step_id,
                    channel=inp.channel,
                    occurred_at=inp.now,
                    dedup_key=f"{key}:r{inp.round}:deferred",
                    data={
                        "until": reservation.slot_at.isoformat(),
                        "reason": reservation.reason or "",
                        "sender_id": reservation.sender_id,
                    },
                )
        return ReserveSlotOutput(
            sender_id=reservation.sender_id, slot_at=reservation.slot_at, reason=reservation.reason
        )

    # ------------------------------------------------------------------ send_step
    @activity.defn(name="send_step")
    async def send_step(self, inp: SendStepInput) -> SendStepOutput:
        """Reserve the step's slot and, when it is due now, send at once: `deliver` without a second activity.

        The reservation is `reserve_send_slot`'s (idempotent per round) and the send is
        `deliver`'s, gate and ledger included, so a retry of this activity finds its slot and
        its ledger row again. A slot later than `SEND_AT_ONCE` is returned for the workflow to
        wait on with a durable timer. When the governor cannot answer now (every sender
        paused, no slot within a year, the database away) nothing is sent and the workflow
        asks through `reserve_send_slot`, whose retries wait as long as that takes.
        """
        t0 = time.monotonic()
        async with _heartbeating():
            try:
                slot = await self._reserve(inp.reserve)
            except Exception as err:  # noqa: BLE001 - `reserve_send_slot` retries it as long as it takes
                activity.logger.info("send_step %s: no slot now (%s); asking again", inp.reserve.step_id, err)
                return SendStepOutput()
            extras = _Extras(inp.started, inp.finish)
            # now: this attempt's start on Temporal's clock plus the time since, or this worker's
            # clock if later (the governor's slot is never earlier than the later of the two)
            elapsed = timedelta(seconds=time.monotonic() - t0)
            now = max(activity_now(inp.deliver.now) + elapsed, datetime.now(UTC))
            wait = (slot.slot_at - now).total_seconds()
            if slot.ended or slot.sender_id is None or wait > SEND_AT_ONCE.total_seconds():
                await self._write_extras(extras, None)
                return SendStepOutput(slot=slot)
            if wait > 0:  # never before its slot
                await asyncio.sleep(wait)
            request = inp.deliver.model_copy(update={"sender_id": slot.sender_id, "slot_at": slot.slot_at})
            _EXTRAS.set(extras)  # the claim's and the outcome's transactions write them
            out = await self._deliver_step(request)
            await self._write_extras(extras, out.status)  # what those transactions did not
            return SendStepOutput(slot=slot, delivered=out, finished=extras.finish_done)

    async def _write_extras(self, extras: _Extras, status: DeliveryStatus | None) -> None:
        """The step's start if not written yet, and the end if `status` ends the walk and it is not."""
        started = extras.started if not extras.started_done else None
        finish = extras.finish if status in ENDS_THE_WALK and not extras.finish_done else None
        if started is None and finish is None:
            return
        async with self.session_factory() as session, session.begin():
            if started is not None:
                await write_event(session, started)
            if finish is not None:
                await write_finish(session, finish)
        extras.started_done = extras.started_done or started is not None
        extras.finish_done = extras.finish_done or finish is not None

    # ------------------------------------------------------------------ deliver
    @activity.defn(name="deliver")
    async def deliver(self, inp: DeliverInput) -> DeliverOutput:
        """Perform the step's action through its channel, exactly once."""
        async with _heartbeating():
            return await self._deliver_step(inp)

    async def _deliver_step(self, inp: DeliverInput) -> DeliverOutput:
        """The moment-of-send gate, then the ledger and the channel (the caller heartbeats)."""
        step = inp.step
        channel = step.channel
        if channel is None:
            raise ApplicationError(f"{step.action} has no channel", non_retryable=True)
        key = delivery_key(inp.ref.enrollment_id, step.id, inp.attempt)
        late = await check_send_gate(
            self.session_factory, inp, key, timedelta(seconds=self.config.send_late_grace_seconds)
        )
        if late is not None:  # off-window or well past its slot: ask for a new slot, nothing sent
            return late
        me = _Owner.current("deliver")
        _ATTEMPT_T0.set((time.monotonic(), activity_now(inp.now)))
        try:
            return await self._deliver(inp, key, str(channel), me)
        except _Lost as lost:
            return await self._lost(key, me, lost)
        except _Rescheduled as again:  # the sender is paused: a new round waits for it
            return again.output

    async def _deliver(self, inp: DeliverInput, key: str, channel: str, me: _Owner) -> DeliverOutput:
        step = inp.step
        kind = Channel(channel)
        delivery, found = await self._claim_and_read(inp, key, channel, me)
        if delivery.status in DELIVERY_FINAL:
            return self._output(delivery, duplicate=True)
        if delivery.status == DeliveryStatus.SENDING:  # an earlier attempt may have written to the provider
            if delivery.owner_attempt > me.attempt:
                raise _Lost(f"the newer attempt {delivery.owner_attempt} is sending it")
            return await self._finalize(
                inp,
                delivery,
                DeliveryStatus.UNCERTAIN,
                error="the process stopped after calling the provider",
                expect=(DeliveryStatus.SENDING,),
                owner=delivery.owner,
                new_owner=me,
            )
        if delivery.owner != me.token:
            raise _Lost(f"attempt {delivery.owner_attempt} owns it")
        await self._hook("after_claim")
        assert found is not None  # read above: this attempt owns the row
        person, identities, sender, suppressions = found
        if person is None:
            return await self._finalize(inp, delivery, DeliveryStatus.FAILED, error="unknown person")
        target = next((i for i in identities if i.channel == target_kind(kind)), None)
        stand_in = stand_in_kind(kind)
        if target is None and stand_in:
            target = next((i for i in identities if i.channel == stand_in), None)
        if target is None:  # nothing to send to on this channel: the lead moves on
            wanted = " or ".join(kinds_for_channel(kind))
            return await self._finalize(inp, delivery, DeliveryStatus.SKIPPED, error=f"person has no {wanted} identity")
        if sender is None:
            return await self._finalize(inp, delivery, DeliveryStatus.FAILED, error="no sender account")

        # The gate: right before the provider call (and before any lookup at the provider).
        blocked = _gate(person, target, suppressions)
        if blocked:
            return await self._finalize(inp, delivery, DeliveryStatus.SUPPRESSED, error=blocked)
        if is_paused(sender, _now(inp)):  # the breaker holds it: the lead waits, nothing is sent
            raise await self._sender_paused(inp, delivery, me, sender.id, describe(sender))
        if stand_in and target.channel == stand_in:
            resolved = await self._resolve_x_handle(inp, delivery, target)
            if isinstance(resolved, DeliverOutput):
                return resolved
            async with self.session_factory() as session:
                more = list(
                    (await session.execute(select(Suppression).where(Suppression.identity_id == resolved.id))).scalars()
                )
            blocked = _gate(person, resolved, more)
            if blocked:
                return await self._finalize(inp, delivery, DeliveryStatus.SUPPRESSED, error=blocked)
            target = resolved
            identities.append(resolved)
            await self._hook("after_resolve")

        try:
            content = render_step(step, inp.variant, person_context(person, identities))
        except Exception as err:  # a template problem is permanent: never half-send
            return await self._finalize(inp, delivery, DeliveryStatus.FAILED, error=f"template: {err}")

        clicks = await self._click_tracking(inp) if channel == "email" else None
        message = self._message(inp, key, channel, sender, target, content, clicks, message_id=delivery.message_id)
        if channel == "email" and sender.dkim_selector and sender.dkim_private_key:
            message = message.model_copy(update={"dkim": await self._dkim_key(inp, delivery, sender, me)})
        return await _to_the_end(self._send(inp, delivery, message, target, me))

    async def _send(
        self, inp: DeliverInput, delivery: Delivery, message: OutboundMessage, target: Identity, me: _Owner
    ) -> DeliverOutput:
        """The provider call, with `sending` marked by the channel's callback, and its outcome.

        One database connection is held from `sending` to the outcome. It is taken when the
        channel has its own connection (at `sending`, so a send waiting for an SMTP connection
        holds none) and kept for the outcome's statement: the time a row spends `sending`, which
        a crash turns into an uncertain delivery, is then the provider's answer, never a wait for
        the database pool behind other sends.
        """
        key, channel = delivery.idempotency_key, message.channel
        client = self.channels.get(channel)
        if client is None:
            return await self._finalize(inp, delivery, DeliveryStatus.FAILED, error=f"no {channel} channel")
        target_id = target.id
        async with AsyncExitStack() as held:
            session: AsyncSession | None = None  # the held connection, once `sending` is marked

            async def mark_sending() -> None:
                """claimed → sending, by this attempt only, right before the irreversible write."""
                await self._hook("before_write")
                nonlocal session
                if session is None:  # one statement each: no transaction
                    session = await held.enter_async_context(autocommit(self.session_factory))
                won = await _transition(
                    session,
                    delivery.id,
                    expect=(
                        DeliveryStatus.CLAIMED,
                        DeliveryStatus.SENDING,
                    ),  # `sending`: the pool's one reconnect calls it again
                    owner=me.token,
                    values={
                        "status": DeliveryStatus.SENDING,
                        "message_id": message.message_id,
                        "identity_id": target_id,
                    },
                    count_attempt=True,
                )
                if not won:
                    raise SendAborted(f"delivery {key}: another attempt owns it now; nothing written")

            try:
                result = await client.send(message, mark_sending)
            except SendAborted as err:
                raise _Lost(str(err)) from err
            except SenderConfigError as err:
                raise await self._sender_refused(inp, delivery, me, err) from err
            except TransientChannelError as err:
                async with self.session_factory() as tx, tx.begin():
                    won = await _transition(
                        tx,
                        delivery.id,
                        expect=DELIVERY_IN_FLIGHT,
                        owner=me.token,
                        values={"status": DeliveryStatus.CLAIMED, "error": str(err)},
                    )
                    if won and err.code in THROTTLE_CODES and inp.sender_id is not None:
                        await sender_breaker.record_throttle(
                            tx, inp.sender_id, str(err), self.config.breaker, _now(inp)
                        )
                if not won:
                    raise _Lost("taken while the provider answered") from err
                raise ApplicationError(
                    f"transient {channel} error: {redact(str(err), target.value)}",
                    type="TransientChannelError",
                    next_retry_delay=(timedelta(seconds=err.retry_after) if err.retry_after else None),
                ) from err
            except PermanentChannelError as err:
                status = DeliveryStatus.BOUNCED if err.bounce else DeliveryStatus.FAILED
                out = await self._finalize(
                    inp,
                    delivery,
                    status,
                    error=str(err),
                    bounce_identity=target if err.bounce else None,
                    expect=DELIVERY_IN_FLIGHT,
                    session=session,
                )
                if err.bounce and inp.sender_id is not None:
                    async with self.session_factory() as tx, tx.begin():
                        if await sender_breaker.check_bounce_rate(tx, inp.sender_id, self.config.breaker, _now(inp)):
                            activity.logger.warning("sender %s paused: bounce rate over threshold", inp.sender_id)
                return out
            except UncertainChannelError as err:
                return await self._finalize(
                    inp,
                    delivery,
                    DeliveryStatus.UNCERTAIN,
                    error=str(err),
                    expect=DELIVERY_IN_FLIGHT,
                    session=session,
                )
            await self._hook("after_send")
            delivery.message_id = message.message_id
            return await self._finalize(
                inp,
                delivery,
                DeliveryStatus.SENT,
                provider_message_id=result.provider_message_id,
                expect=(DeliveryStatus.SENDING,),
                session=session,
            )

    async def _sender_refused(
        self, inp: DeliverInput, delivery: Delivery, me: _Owner, err: SenderConfigError
    ) -> Exception:
        """Our own account was refused: open the sender's breaker (auth), give the row back."""
        now = _now(inp)
        if inp.sender_id is not None:
            async with self.session_factory() as session, session.begin():
                await sender_breaker.pause(
                    session, inp.sender_id, "auth", str(err), now=now, until=now + self.config.breaker.cooldown
                )
            activity.logger.warning("sender %s paused: %s", inp.sender_id, err)
        return await self._sender_paused(inp, delivery, me, inp.sender_id, f"paused (auth): {err}")

    async def _sender_paused(
        self, inp: DeliverInput, delivery: Delivery, me: _Owner, sender_id: int | None, why: str
    ) -> Exception:
        """The row goes back to `claimed` (nothing was written) and the lead waits for the sender.

        A workflow with the send gate (`inp.slot_at` set) gets `reschedule` at once: the row is
        fenced (no owner, so the next round's `deliver` takes it), and the new reservation
        waits while the governor grants the paused sender nothing (until `senders resume`, or
        a probe after the cool-down). An older workflow gets a retryable `SenderPaused`
        after the cool-down (or a minute for a manual pause).
        """
        gate = inp.slot_at is not None
        async with self.session_factory() as session, session.begin():
            values: dict[str, Any] = {"status": DeliveryStatus.CLAIMED, "error": f"sender {sender_id} {why}"}
            if gate:
                values.update(owner=None, owner_attempt=0)
            won = await _transition(
                session,
                delivery.id,
                expect=DELIVERY_IN_FLIGHT,
                owner=me.token,
                values=values,
            )
            sender = await session.get(SenderAccount, sender_id) if sender_id is not None else None
        if not won:
            raise _Lost("taken while the sender was paused")
        if gate:
            return _Rescheduled(DeliverOutput(status=DeliveryStatus.RESCHEDULE, error=f"sender {sender_id} {why}"))
        now = _now(inp)
        wait = self.config.breaker.cooldown
        if sender is not None and sender.paused_until is not None:
            wait = max(sender.paused_until - now, timedelta(seconds=1))
        elif sender is not None and sender.paused_kind == "manual":
            wait = timedelta(minutes=1)
        return ApplicationError(
            f"sender {sender_id} {why}; the lead waits (`senders resume {sender_id}` lets it go on)",
            type="SenderPaused",
            next_retry_delay=wait,
        )

    async def _wait_for_paused_senders(self, inp: ReserveSlotInput) -> None:
        """No sender granted a slot: if the breaker holds the channel's senders, wait for them."""
        async with self.session_factory() as session:
            # Every sender with an open breaker, probe time passed or not: the governor and this
            # check may read the clock a moment apart, and a retry soon settles it either way.
            paused = await sender_breaker.paused_senders(session, None, inp.channel)
        if inp.allowed_senders:
            paused = [a for a in paused if a.address in inp.allowed_senders]
        if not paused:
            async with self.session_factory() as session:
                active = list(
                    (
                        await session.execute(
                            select(SenderAccount.address).where(
                                SenderAccount.channel == inp.channel, SenderAccount.active.is_(True)
                            )
                        )
                    ).scalars()
                )
            if any(not inp.allowed_senders or a in inp.allowed_senders for a in active):
                # A sender was resumed between the governor's read and this one: ask again.
                raise ApplicationError(
                    f"no {inp.channel} sender granted a slot just now; asking again",
                    type="SendersPaused",
                    next_retry_delay=timedelta(seconds=1),
                )
        if paused:
            reasons = "; ".join(f"sender {a.id} {describe(a)}" for a in paused[:3])
            now = _now(inp)
            probing = any(a.paused_until is not None and a.paused_until <= now for a in paused)
            raise ApplicationError(
                f"every {inp.channel} sender for this lead is paused: {reasons}",
                type="SendersPaused",
                next_retry_delay=timedelta(seconds=5) if probing else timedelta(minutes=1),
            )

    async def _hook(self, point: str) -> None:
        """The fault hook (tests and the fault bench): may raise, or hold the attempt."""
        held = self._fault(point)
        if inspect.isawaitable(held):
            await held

    async def _lost(self, key: str, me: _Owner, lost: _Lost) -> DeliverOutput:
        """This attempt lost the row: it records nothing. Report the outcome if there is one.

        It lost the row before its write (nothing sent: its `sending` compare-and-set failed) or
        after it (the provider may have the message; whoever holds the row records it, and a
        `sending` row found by a later attempt becomes `uncertain`, never a second send).
        """
        async with self.session_factory() as session:
            delivery = (
                await session.execute(select(Delivery).where(Delivery.idempotency_key == key))
            ).scalar_one_or_none()
        activity.logger.info("delivery %s: attempt %s stood down (%s)", key, me.attempt, lost)
        if delivery is not None and delivery.status in DELIVERY_FINAL:
            return self._output(delivery, duplicate=True)
        raise ApplicationError(
            f"delivery {key}: attempt {me.attempt} no longer owns the ledger row ({lost}); "
            "it records nothing, the row's owner records the outcome",
            type="DeliverySuperseded",
            next_retry_delay=timedelta(seconds=2),
        )

    async def _resolve_x_handle(
        self, inp: DeliverInput, delivery: Delivery, handle: Identity
    ) -> Identity | DeliverOutput:
        """The person's `x` identity for their handle, looked up at X and stored; or the outcome.

        Runs after the claim and before the row is marked `sending`: nothing has been sent,
        so a transient lookup failure puts the row back to `claimed` and retries (honouring
        X's reset header), and a permanent one ends the delivery without any send.
        """
        client = self.channels.get(str(Channel.X))
        if not isinstance(client, XUserResolver):
            return await self._finalize(
                inp,
                delivery,
                DeliveryStatus.FAILED,
                error=f"person has only the X handle @{handle.value} and the x channel cannot resolve handles",
            )
        try:
            user_id = await client.resolve_username(handle.value)
        except SenderConfigError as err:
            raise await self._sender_refused(inp, delivery, _Owner.current("deliver"), err) from err
        except (TransientChannelError, UncertainChannelError) as err:  # a lookup performs nothing: retry it
            async with self.session_factory() as session, session.begin():
                won = await _transition(
                    session,
                    delivery.id,
                    expect=(DeliveryStatus.CLAIMED,),
                    owner=delivery.owner,
                    values={"error": f"resolving @{handle.value}: {err}"},
                )
            if not won:
                raise _Lost("taken while resolving the handle") from err
            retry_after = err.retry_after if isinstance(err, TransientChannelError) else None
            raise ApplicationError(
                f"transient x error resolving the handle of identity {handle.id}: {redact(str(err), handle.value)}",
                type="TransientChannelError",
                next_retry_delay=(timedelta(seconds=retry_after) if retry_after else None),
            ) from err
        except PermanentChannelError as err:
            return await self._finalize(
                inp,
                delivery,
                DeliveryStatus.BOUNCED if err.bounce else DeliveryStatus.FAILED,
                error=f"x handle @{handle.value} could not be resolved: {err}",
                bounce_identity=handle if err.bounce else None,
            )
        try:
            async with self.session_factory() as session, session.begin():
                identity, created = await attach_identity(
                    session, inp.ref.person_id, "x", user_id, consent=handle.consent
                )
                if created:
                    await append_event(
                        session,
                        type_=EventType.IDENTITY_RESOLVED,
                        ref=inp.ref,
                        step_id=inp.step.id,
                        channel=str(Channel.X),
                        delivery_id=delivery.id,
                        occurred_at=inp.now,
                        dedup_key=f"x_handle:{handle.id}:{user_id}",
                        data={"x_handle": handle.value, "x_user_id": user_id, "identity_id": identity.id},
                    )
        except IdentityOwnedError as err:
            return await self._finalize(
                inp,
                delivery,
                DeliveryStatus.FAILED,
                error=(
                    f"x handle @{handle.value} resolves to X user id {user_id}, which already belongs to "
                    f"person {err.owner_id}: the same X account is two people here; nothing was sent "
                    "(merge the two people or correct the handle)"
                ),
            )
        except ValueError as err:  # not a user id: the resolver broke its contract
            return await self._finalize(
                inp, delivery, DeliveryStatus.FAILED, error=f"x handle @{handle.value} resolved to a bad user id: {err}"
            )
        activity.logger.info("x handle @%s resolved to user id %s", handle.value, user_id)
        return identity

    @activity.defn(name="give_up_delivery")
    async def give_up_delivery(self, inp: DeliverInput) -> DeliverOutput:
        """After retries ran out: mark the delivery failed (a dead letter), never re-send.

        It takes the row from whichever attempt holds it (compare-and-set on the status and
        owner it read): a `deliver` attempt still running finds it no longer owns the row and
        sends nothing, so the lead is never contacted after its delivery ended `failed`. A
        row already `sending` may have been written to the provider: it ends `uncertain`.
        """
        key = delivery_key(inp.ref.enrollment_id, inp.step.id, inp.attempt)
        me = _Owner.current("give_up")
        for _ in range(10):
            delivery = await self._claim(inp, key, str(inp.step.channel), me, take_over=False)
            if delivery.status in DELIVERY_FINAL:
                return self._output(delivery, duplicate=True)
            status = DeliveryStatus.UNCERTAIN if delivery.status == DeliveryStatus.SENDING else DeliveryStatus.FAILED
            try:
                return await self._finalize(
                    inp,
                    delivery,
                    status,
                    error=f"gave up after retries: {delivery.error or ''}".strip(),
                    expect=(DeliveryStatus(delivery.status),),
                    owner=delivery.owner,
                    new_owner=me,
                )
            except _Lost:
                continue  # an attempt moved it meanwhile: read it again
        raise ApplicationError(f"delivery {key}: the ledger row kept changing while giving up", type="LedgerBusy")

    # ------------------------------------------------------------------ internals
    async def _claim(
        self, inp: DeliverInput, key: str, channel: str, me: _Owner, *, take_over: bool = True
    ) -> Delivery:
        """The ledger row, inserted `claimed` and owned by `me` if new.

        A `claimed` row held by an older `deliver` attempt (a stalled or dead worker), or by
        another execution of the same local activity attempt (`_Owner.current`), is taken
        over; one held by a newer attempt is not (the caller finds `owner` is not `me`).
        """
        async with self.session_factory() as session, session.begin():
            return await self._claim_in(session, inp, key, channel, me, take_over=take_over)

    async def _claim_and_read(
        self, inp: DeliverInput, key: str, channel: str, me: _Owner
    ) -> tuple[Delivery, _Recipient | None]:
        """The claim, the step's start and what the send needs, read when this attempt owns the row.

        A new row (the usual case) costs one statement, committed on its own: the claim's
        INSERT, the step's `step_started` (idempotent by its key) and the reads of the person,
        their identities, the sender and the suppressions, in one round trip. A row that is
        there already (a retry, a takeover) is read and maybe taken over in a transaction.
        """
        extras = _EXTRAS.get()
        started = extras.started if extras is not None and not extras.started_done else None
        values = {**_claim_params(inp, key, channel, me), **_recipient_params(inp)}
        if started is not None:
            values.update(event_write_params(started))
        stmt = _claim_statement(event_shape(started) if started is not None else None)
        async with autocommit(self.session_factory) as session:
            rows = (await session.execute(stmt, values)).all()
        if extras is not None and started is not None:
            extras.started_done = True  # the step's start, with its claim
        if rows:  # new: claimed by `me`
            return rows[0][0], _Recipient.of(rows)
        async with self.session_factory() as session, session.begin():
            delivery = await self._claim_in(session, inp, key, channel, me)
            ours = delivery.status == DeliveryStatus.CLAIMED and delivery.owner == me.token
            found = await self._recipient(session, inp) if ours else None
        return delivery, found

    async def _claim_in(
        self, session: AsyncSession, inp: DeliverInput, key: str, channel: str, me: _Owner, *, take_over: bool = True
    ) -> Delivery:
        """`_claim` inside the caller's transaction (a new row costs one statement: its INSERT returns it)."""
        inserted = (await session.execute(_CLAIM, _claim_params(inp, key, channel, me))).scalar_one_or_none()
        if inserted is not None:  # new: claimed by `me`
            return inserted
        delivery = (
            await session.execute(select(Delivery).where(Delivery.idempotency_key == key).with_for_update())
        ).scalar_one()
        if (
            take_over
            and delivery.status == DeliveryStatus.CLAIMED
            and delivery.owner != me.token
            and (delivery.owner is None or delivery.owner_attempt <= me.attempt)
        ):
            await session.execute(
                update(Delivery)
                .where(Delivery.id == delivery.id)
                .values(owner=me.token, owner_attempt=me.attempt, sender_id=inp.sender_id)
            )
            delivery.owner, delivery.owner_attempt = me.token, me.attempt
        return delivery

    @staticmethod
    async def _recipient(session: AsyncSession, inp: DeliverInput) -> _Recipient:
        """The person, their identities, the sender account and the suppressions that apply."""
        return _Recipient.of((await session.execute(_RECIPIENT, _recipient_params(inp))).all())

    def _message(
        self,
        inp: DeliverInput,
        key: str,
        channel: str,
        sender: SenderAccount,
        target: Identity,
        content: Any,
        clicks: bool | None = None,
        *,
        message_id: str | None = None,
    ) -> OutboundMessage:
        """The message to send; `clicks` is None (no click tracking) or whether text links are tracked too.

        `message_id` is the one an earlier attempt stored in the ledger (kept for retries).
        """
        base = self.config.public_base_url.rstrip("/")
        unsubscribe = make_token(
            self.config.link_secret,
            "unsubscribe",
            {"p": inp.ref.person_id, "i": target.id, "e": inp.ref.enrollment_id},
        )
        html = content.html
        if inp.track_opens and channel == "email":
            # a text-only step gets the HTML part the channel would build, with the pixel in it
            html = html if html is not None else text_to_html(content.text or "")
            pixel = make_token(self.config.link_secret, "open", {"k": key})
            html += f'<img src="{base}/o/{pixel}" width="1" height="1" alt="" />'
        text = content.text
        if clicks is not None and channel == "email":
            html, text = self._track_clicks(key, html, text, in_text=clicks)
        domain = sender.address.rsplit("@", 1)[-1] if "@" in sender.address else "sequencer.local"
        thread = list(inp.thread_message_ids)
        return OutboundMessage(
            channel=channel,
            action=str(inp.step.action),
            idempotency_key=key,
            sender=sender.address,
            sender_name=sender.display_name,
            sender_id=sender.id,
            to=target.value,
            subject=content.subject,
            text=text,
            html=html,
            message_id=(
                (message_id or make_message_id(key, domain, secret=self.config.link_secret))
                if channel == "email"
                else None
            ),
            in_reply_to=thread[-1] if thread else None,
            references=thread,
            unsubscribe_url=f"{base}/u/{unsubscribe}",
            unsubscribe_mailto=(
                f"mailto:{self.config.unsubscribe_mailto}?subject=unsubscribe-{unsubscribe}"
                if channel == "email" and self.config.unsubscribe_mailto
                else None
            ),
            footer=self.config.postal_address,
        )

    async def _dkim_key(self, inp: DeliverInput, delivery: Delivery, sender: SenderAccount, me: _Owner) -> DkimKey:
        """The sender's DKIM key, decrypted just for this send; a key that cannot be opened sends nothing.

        A wrong or missing SECRETS_KEY is our configuration, not the lead's fault: like an SMTP
        secret that cannot be opened, it pauses the sender with the reason (`senders list`,
        /healthz) and the lead waits, the row back to `claimed`.
        """
        name = f"sender {sender.id} DKIM key"
        try:
            if self.config.secrets is None:
                raise SecretKeyError(f"SECRETS_KEY is not configured: cannot open the {name}")
            pem = self.config.secrets.decrypt(sender.dkim_private_key or "", what=name)
        except SecretKeyError as err:
            refused = SenderConfigError(f"cannot sign with DKIM: {err}", code="sender_config")
            raise await self._sender_refused(inp, delivery, me, refused) from None
        domain = sender.dkim_domain or sender.address.rsplit("@", 1)[-1]
        return DkimKey(selector=sender.dkim_selector or "", domain=domain, private_key=SecretStr(pem))

    async def _click_tracking(self, inp: DeliverInput) -> bool | None:
        """None when the sequence does not track clicks, else whether text links are tracked too.

        Read from the stored version (immutable: read once per process), so the workflow's input
        needs no new field.
        """
        version_id = inp.ref.sequence.version_id
        if version_id not in self._clicks:
            self._clicks[version_id] = await self._read_click_tracking(version_id)
        return self._clicks[version_id]

    async def _read_click_tracking(self, version_id: int) -> bool | None:
        async with self.session_factory() as session:
            definition = (
                await session.execute(select(SequenceVersion.definition).where(SequenceVersion.id == version_id))
            ).scalar_one_or_none()
        if not isinstance(definition, dict) or not definition.get("track_clicks"):
            return None
        return bool(definition.get("track_clicks_in_text"))

    def _track_clicks(
        self, key: str, html: str | None, text: str | None, *, in_text: bool
    ) -> tuple[str | None, str | None]:
        """Links through `/c/{token}`, the target sealed in the token (services/click_tracking.py)."""
        base = self.config.public_base_url.rstrip("/")

        def link(url: str) -> str:
            return f"{base}/c/{make_token(self.config.link_secret, 'click', {'k': key, 'u': url})}"

        return (
            rewrite_html(html, link) if html is not None else None,
            rewrite_text(text, link) if text is not None and in_text else text,
        )

    def _output(self, delivery: Delivery, *, duplicate: bool = False) -> DeliverOutput:
        # The ledger keeps the provider's full text; the workflow's history gets it without
        # addresses (providers quote the recipient), naming the delivery id instead.
        return DeliverOutput(
            status=delivery.status,
            delivery_id=delivery.id,
            message_id=delivery.message_id,
            provider_message_id=delivery.provider_message_id,
            error=redact(delivery.error),
            duplicate=duplicate,
        )

    async def _finalize(
        self,
        inp: DeliverInput,
        delivery: Delivery,
        status: DeliveryStatus,
        *,
        error: str | None = None,
        provider_message_id: str | None = None,
        bounce_identity: Identity | None = None,
        expect: tuple[DeliveryStatus, ...] = (DeliveryStatus.CLAIMED,),
        owner: str | None = None,
        new_owner: _Owner | None = None,
        session: AsyncSession | None = None,
    ) -> DeliverOutput:
        """Record the outcome if the row is still `expect`ed and held by `owner` (default: its owner).

        Raises `_Lost` (recording nothing: no status, no event, no suppression) otherwise.
        `session`: an autocommit session the caller holds (else one is taken for the statement).
        """
        now = datetime.now(UTC)
        values: dict[str, Any] = {"status": status, "error": error}
        if provider_message_id:
            values["provider_message_id"] = provider_message_id
        if status == DeliveryStatus.SENT:
            now = _accepted_at()
            values["sent_at"] = now
        if new_owner is not None:
            values["owner"] = new_owner.token
        extras = _EXTRAS.get()
        finish = extras.finish if extras is not None and status in ENDS_THE_WALK else None
        breaker = status == DeliveryStatus.SENT and inp.sender_id is not None  # a send went through
        expected_owner = delivery.owner if owner is None and new_owner is None else owner
        shape = _Outcome(
            tuple(expect),
            expected_owner is None,
            tuple(values),
            finish is not None,
            breaker,
            bounce_identity is not None,
        )
        event = event_params(
            type_=EventType(status),
            ref=inp.ref,
            step_id=inp.step.id,
            variant=inp.variant,
            channel=str(inp.step.channel),
            delivery_id=delivery.id,
            # `sent`: when the provider accepted it, not when the step was planned
            occurred_at=now if status == DeliveryStatus.SENT else inp.now,
            dedup_key=f"{delivery.idempotency_key}:{status}",
            data={
                k: v
                for k, v in {
                    "error": error,
                    "message_id": delivery.message_id,
                    "provider_message_id": provider_message_id,
                    "action": str(inp.step.action),
                }.items()
                if v
            },
        )
        values = {**_cas_params(delivery.id, expected_owner, values), **event}
        if finish is not None:
            values.update(finish_params(finish))
        if breaker and inp.sender_id is not None:
            values.update(sender_breaker.success_params(inp.sender_id, _now(inp)))
        if bounce_identity is not None:
            suppression = {"identity_id": bounce_identity.id, "reason": "bounce", "source": f"delivery {delivery.id}"}
            values.update(params("x_", suppression))
        async with nullcontext(session) if session is not None else autocommit(self.session_factory) as writer:
            won, probe_closed = (await writer.execute(_outcome_statement(shape), values)).one()  # all or nothing
        if not won:
            raise _Lost(f"could not record {status}: the row moved on")
        if finish is not None and extras is not None:
            extras.finish_done = True
        if probe_closed:  # the breaker's probe
            activity.logger.info("sender %s: the probe went through, the breaker is closed", inp.sender_id)
        delivery.status = status
        delivery.error = error
        delivery.provider_message_id = provider_message_id or delivery.provider_message_id
        activity.logger.info("delivery %s: %s %s", delivery.idempotency_key, status, error or "")
        out = self._output(delivery)
        if error:  # also take out the person's own values (a handle, an address too odd for the patterns)
            async with self.session_factory() as session:
                query = select(Identity.value).where(Identity.person_id == inp.ref.person_id)
                out.error = redact(error, *(await session.execute(query)).scalars())
        return out


#: Replies that mean "too much, slow down": SMTP 421 and HTTP 429.
THROTTLE_CODES = frozenset({"421", "429"})


def _now(inp: DeliverInput | ReserveSlotInput) -> datetime:
    """The latest of the wall clock, the workflow's time and this attempt's scheduling time.

    Retries reuse their input, so the server's scheduled time is what moves for them (and
    the only clock that moves in a time-skipping test).
    """
    scheduled = activity.info().current_attempt_scheduled_time if activity.in_activity() else None
    return max(t for t in (datetime.now(UTC), inp.now, scheduled) if t is not None)


@asynccontextmanager
async def _heartbeating() -> AsyncIterator[None]:
    """Heartbeat while the body runs, a few times per heartbeat timeout.

    The process is alive as long as it heartbeats; when it dies (SIGKILL, a lost host) the
    server notices within the timeout and hands the send to another worker, which takes
    the `claimed` row over or records a `sending` one as uncertain.
    """
    timeout = activity.info().heartbeat_timeout
    if not timeout:
        yield
        return

    async def beat() -> None:
        # The server's clock for the timeout starts with the attempt, so a first beat at once
        # would only cost a round trip to the server: a send that is done within a second
        # (most are) never beats; a longer one beats from then on, a few times per timeout.
        every = max(timeout.total_seconds() / 4, 0.2)
        await asyncio.sleep(min(FIRST_BEAT, every))
        while True:
            activity.heartbeat()
            await asyncio.sleep(every)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


async def _to_the_end(send: Coroutine[Any, Any, DeliverOutput]) -> DeliverOutput:
    """Run the provider call and its outcome to their end, even if this attempt is cancelled.

    A local send is cancelled when its workflow is evicted from the worker's cache (a failed
    workflow task completion while the server restarts, say), an activity by a shutdown or a
    lost heartbeat. Cut in the middle of the write, the row would stay `sending` and the lead's
    message would end uncertain, never re-sent. So the send finishes and records its outcome
    (only a dead process still cuts it); the cancelled attempt still ends at once, and its
    retry finds the row sent, or takes a `claimed` one over (this send's `sending`
    compare-and-set then fails and it writes nothing).
    """
    task = asyncio.ensure_future(send)
    _FINISHING.add(task)  # the loop keeps only a weak reference: a send left alone must not be collected
    task.add_done_callback(_finished)
    return await asyncio.shield(task)


#: Sends running to their end (see `_to_the_end`), held here until they are done.
_FINISHING: set[asyncio.Future[DeliverOutput]] = set()


def _finished(task: asyncio.Future[DeliverOutput]) -> None:
    """Let go of a finished send; its exception is retrieved here if its attempt was cancelled."""
    _FINISHING.discard(task)
    if not task.cancelled():
        task.exception()


class _Rescheduled(Exception):
    """Nothing was sent and the workflow should ask for a new slot (a paused sender)."""

    def __init__(self, output: DeliverOutput) -> None:
        super().__init__(output.error)
        self.output = output


class _Lost(Exception):
    """This attempt no longer owns the delivery (a newer attempt or the give-up took it)."""


@dataclass(frozen=True)
class _Owner:
    """Who holds a ledger row: the activity attempt's token and its attempt number."""

    token: str
    attempt: int

    @classmethod
    def current(cls, kind: str) -> _Owner:
        """This attempt; its number orders attempts across activities of the run.

        Activity ids of a workflow run count up ("1", "2", …), and the workflow schedules a
        new `deliver` for the same row only after the previous one ended (a paused sender),
        so (activity id, attempt) is the order in which attempts were started.

        A local activity is not unique by them: when its workflow task fails or times out
        (a dead or cut-off worker), the task's replay runs it again with the same id and
        attempt, maybe while the first execution still runs. So its token carries a random
        part: the two are different owners of the same rank, and the later one takes a
        `claimed` row over (`_claim_in`), records a `sending` one as uncertain, and the
        earlier one's compare-and-sets then fail: it sends nothing more.
        """
        info = activity.info()
        sequence = int(info.activity_id) if info.activity_id.isdigit() else 0
        token = f"{kind}:{info.workflow_run_id}:{info.activity_id}:{info.attempt}"
        if info.is_local:
            token += f":{uuid.uuid4().hex}"
        return cls(token, sequence * 10_000 + info.attempt)


async def _transition(
    session: AsyncSession,
    delivery_id: int,
    *,
    expect: tuple[str, ...],
    owner: str | None,
    values: dict[str, Any],
    count_attempt: bool = False,
) -> bool:
    """One compare-and-set on a ledger row: apply `values` only if its status and owner are as expected.

    `count_attempt`: `attempts_made` goes up by one if the row was `claimed` (a first write).
    """
    stmt = _cas(tuple(expect), owner is None, tuple(values), count_attempt)
    result = await session.execute(stmt, _cas_params(delivery_id, owner, values))
    return result.first() is not None


@lru_cache(maxsize=64)
def _cas(expect: tuple[str, ...], unowned: bool, columns: tuple[str, ...], count_attempt: bool = False) -> Update:
    """The compare-and-set UPDATE (RETURNING the id when it won), on the table: no ORM bookkeeping.

    Parameters: `_cas_params`; `unowned`: the row must have no owner.
    """
    ledger = table_of(Delivery)
    owned = ledger.c.owner.is_(None) if unowned else ledger.c.owner == bindparam("c_owner")
    values: dict[str, Any] = {c: bindparam(f"v_{c}", type_=ledger.c[c].type) for c in columns}
    if count_attempt:
        values["attempts_made"] = ledger.c.attempts_made + (ledger.c.status == DeliveryStatus.CLAIMED).cast(Integer)
    return (
        update(ledger)
        .where(ledger.c.id == bindparam("c_id"), ledger.c.status.in_(expect), owned)
        .values(**values)
        .returning(ledger.c.id)
    )


def _cas_params(delivery_id: int, owner: str | None, values: dict[str, Any]) -> dict[str, Any]:
    return {"c_id": delivery_id, "c_owner": owner, **params("v_", values)}


class _Outcome(NamedTuple):
    """The shape of an outcome's statement (`_outcome_statement`)."""

    expect: tuple[str, ...]
    unowned: bool
    columns: tuple[str, ...]
    finish: bool
    breaker: bool
    bounce: bool


@lru_cache(maxsize=64)
def _outcome_statement(shape: _Outcome) -> Select[Any]:
    """An outcome as one statement: the compare-and-set, and only if it won, the rest.

    The rest: the enrollment's end (`finish`), the sender breaker's success (`breaker`), the
    bounced identity's suppression (`bounce`, parameters `x_`), the outcome's event (`e_`).
    Returns whether the compare-and-set won and whether a breaker's probe closed it.
    """
    moved = _cas(shape.expect, shape.unowned, shape.columns).cte("moved")
    writes: list[Any] = finish_writes(after=moved) if shape.finish else []
    closed: Any = literal(0)
    if shape.breaker:
        closes, resets = sender_breaker.success_writes(after=moved)
        closed = select(func.count()).select_from(closes.cte("closes")).scalar_subquery()
        writes.append(resets)
    if shape.bounce:
        writes.append(insert_if(Suppression, ("identity_id", "reason", "source"), moved, "x_"))
    writes.append(event_insert(after=moved))
    stmt = select(select(func.count()).select_from(moved).scalar_subquery(), closed)
    for i, write in enumerate(writes):
        stmt = stmt.add_cte(write.cte(f"write_{i}"))
    return stmt
