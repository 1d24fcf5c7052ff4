"""Sending one step's action exactly once: governor slot, ledger, gate, render, channel.

The order inside `deliver` is what makes "no double sends, ever" true:

1. Claim the ledger row keyed by (enrollment, step, attempt of that step). A row that
   already reached an outcome is returned as it is: a retry never sends again.
2. The suppression/consent gate, right before the provider call. An X step for a person
   known only by handle first resolves it to the numeric user id (a read at X, never a
   send) and stores that id as the person's `x` identity, so it is looked up once and
   inbound events from the id find the person; the gate is applied to both.
3. Render the template (a broken template is a permanent failure, never a half-send).
4. Mark the row `sending` and commit, then call the provider. If the process dies
   after this commit, the retry finds `sending` and records the delivery as
   `uncertain`: it may have gone out, so it is never re-sent.
5. Record the outcome and append events.

Transient errors put the row back to `claimed` and raise a retryable ApplicationError
(with `next_retry_delay` from the provider's reset header); permanent ones mark it
`failed` or `bounced` (a bounce also suppresses that identity) and return normally so
the workflow can take the failure path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.channels.base import (
    ChannelClient,
    OutboundMessage,
    PermanentChannelError,
    TransientChannelError,
    UncertainChannelError,
    make_message_id,
)
from activities.channels.email import text_to_html
from activities.channels.x import XUserResolver
from activities.governor import NoSlotError, SendGovernor
from activities.records import append_event
from db.session import SessionFactory
from db.tables import Delivery, Identity, Person, SenderAccount, Suppression
from models.activities import (
    DeliverInput,
    DeliverOutput,
    ReserveSlotInput,
    ReserveSlotOutput,
)
from models.identity_kinds import kinds_for_channel, stand_in_kind, target_kind
from models.sequence import MESSAGE_ACTIONS, Action, Channel
from services.identities import IdentityOwnedError, attach_identity
from services.templating import person_context, render_step
from services.tokens import make_token

FINAL = {"sent", "failed", "bounced", "uncertain", "suppressed", "skipped"}


@dataclass
class DeliveryConfig:
    """What delivery needs from settings (kept explicit so tests can build it)."""

    public_base_url: str
    link_secret: str
    postal_address: str
    person_daily_touch_cap: int = 1


def _gate(person: Person, target: Identity, suppressions: list[Suppression]) -> str | None:
    """Why this send must not happen (a suppression of the person or target, denied consent), or None."""
    for sup in suppressions:
        if sup.person_id == person.id or sup.identity_id == target.id:
            scope = "person" if sup.person_id == person.id else target.value
            return f"suppressed ({scope}): {sup.reason}"
    if target.consent == "denied":
        return f"consent denied for {target.value}"
    return None


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
        fault: Callable[[str], None] | None = None,
    ) -> None:
        self.session_factory = session_factory
        self.governor = governor
        self.channels = channels
        self.config = config
        self._fault = fault or (lambda point: None)

    # ------------------------------------------------------------------ slots
    @activity.defn(name="reserve_send_slot")
    async def reserve_send_slot(self, inp: ReserveSlotInput) -> ReserveSlotOutput:
        """Ask the channel's governor for a send time (idempotent per round)."""
        key = delivery_key(inp.ref.enrollment_id, inp.step_id, inp.attempt)
        try:
            reservation = await self.governor.reserve(
                delivery_key=f"{key}:r{inp.round}",
                channel=inp.channel,
                person_id=inp.ref.person_id,
                now=inp.now,
                not_before=inp.not_before,
                preferred_sender_id=inp.preferred_sender_id,
                allowed_senders=inp.allowed_senders or None,
                counts_as_touch=Action(inp.action) in MESSAGE_ACTIONS,
                person_daily_cap=self.config.person_daily_touch_cap,
            )
        except NoSlotError as err:
            # A sender whose caps allow nothing (per_day 0, say) is a configuration to fix, not a
            # lead to drop: ask again hourly, with the reason in the Web UI's pending activity.
            raise ApplicationError(
                f"no send slot within a year: {err} (check the sender's caps with `senders add`)",
                type="NoSendSlot",
                next_retry_delay=timedelta(hours=1),
            ) from err
        if reservation.sender_id is not None and reservation.slot_at > inp.now:
            async with self.session_factory() as session, session.begin():
                await append_event(
                    session,
                    type_="deferred_until",
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

    # ------------------------------------------------------------------ deliver
    @activity.defn(name="deliver")
    async def deliver(self, inp: DeliverInput) -> DeliverOutput:
        """Perform the step's action through its channel, exactly once."""
        step = inp.step
        channel = step.channel
        if channel is None:
            raise ApplicationError(f"{step.action} has no channel", non_retryable=True)
        key = delivery_key(inp.ref.enrollment_id, step.id, inp.attempt)
        delivery = await self._claim(inp, key, str(channel))
        if delivery.status in FINAL:
            return self._output(delivery, duplicate=True)
        if delivery.status == "sending":
            return await self._finalize(
                inp, delivery, "uncertain", error="the process stopped after calling the provider"
            )
        self._fault("after_claim")

        async with self.session_factory() as session:
            person = await session.get(Person, inp.ref.person_id)
            identities = list(
                (await session.execute(select(Identity).where(Identity.person_id == inp.ref.person_id))).scalars()
            )
            sender = await session.get(SenderAccount, inp.sender_id) if inp.sender_id else None
            suppressions = list(
                (
                    await session.execute(
                        select(Suppression).where(
                            (Suppression.person_id == inp.ref.person_id)
                            | Suppression.identity_id.in_([i.id for i in identities] or [-1])
                        )
                    )
                ).scalars()
            )
        if person is None:
            return await self._finalize(inp, delivery, "failed", error="unknown person")
        target = next((i for i in identities if i.channel == target_kind(channel)), None)
        stand_in = stand_in_kind(channel)
        if target is None and stand_in:
            target = next((i for i in identities if i.channel == stand_in), None)
        if target is None:  # nothing to send to on this channel: the lead moves on
            wanted = " or ".join(kinds_for_channel(channel))
            return await self._finalize(inp, delivery, "skipped", error=f"person has no {wanted} identity")
        if sender is None:
            return await self._finalize(inp, delivery, "failed", error="no sender account")

        # The gate: right before the provider call (and before any lookup at the provider).
        blocked = _gate(person, target, suppressions)
        if blocked:
            return await self._finalize(inp, delivery, "suppressed", error=blocked)
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
                return await self._finalize(inp, delivery, "suppressed", error=blocked)
            target = resolved
            identities.append(resolved)
            self._fault("after_resolve")

        try:
            content = render_step(step, inp.variant, person_context(person, identities))
        except Exception as err:  # a template problem is permanent: never half-send
            return await self._finalize(inp, delivery, "failed", error=f"template: {err}")

        message = self._message(inp, key, str(channel), sender, target, content)
        async with self.session_factory() as session, session.begin():
            await session.execute(
                update(Delivery)
                .where(Delivery.id == delivery.id)
                .values(
                    status="sending",
                    message_id=message.message_id,
                    identity_id=target.id,
                    attempts_made=Delivery.attempts_made + 1,
                )
            )
        client = self.channels.get(str(channel))
        if client is None:
            return await self._finalize(inp, delivery, "failed", error=f"no {channel} channel")
        try:
            result = await client.send(message)
        except TransientChannelError as err:
            async with self.session_factory() as session, session.begin():
                await session.execute(
                    update(Delivery).where(Delivery.id == delivery.id).values(status="claimed", error=str(err))
                )
            raise ApplicationError(
                f"transient {channel} error: {err}",
                type="TransientChannelError",
                next_retry_delay=(timedelta(seconds=err.retry_after) if err.retry_after else None),
            ) from err
        except PermanentChannelError as err:
            status = "bounced" if err.bounce else "failed"
            return await self._finalize(
                inp,
                delivery,
                status,
                error=str(err),
                bounce_identity=target if err.bounce else None,
            )
        except UncertainChannelError as err:
            return await self._finalize(inp, delivery, "uncertain", error=str(err))
        self._fault("after_send")
        delivery.message_id = message.message_id
        return await self._finalize(inp, delivery, "sent", provider_message_id=result.provider_message_id)

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
                "failed",
                error=f"person has only the X handle @{handle.value} and the x channel cannot resolve handles",
            )
        try:
            user_id = await client.resolve_username(handle.value)
        except (TransientChannelError, UncertainChannelError) as err:  # a lookup performs nothing: retry it
            async with self.session_factory() as session, session.begin():
                await session.execute(
                    update(Delivery)
                    .where(Delivery.id == delivery.id)
                    .values(status="claimed", error=f"resolving @{handle.value}: {err}")
                )
            retry_after = err.retry_after if isinstance(err, TransientChannelError) else None
            raise ApplicationError(
                f"transient x error resolving @{handle.value}: {err}",
                type="TransientChannelError",
                next_retry_delay=(timedelta(seconds=retry_after) if retry_after else None),
            ) from err
        except PermanentChannelError as err:
            return await self._finalize(
                inp,
                delivery,
                "bounced" if err.bounce else "failed",
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
                        type_="identity_resolved",
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
                "failed",
                error=(
                    f"x handle @{handle.value} resolves to X user id {user_id}, which already belongs to "
                    f"person {err.owner_id}: the same X account is two people here; nothing was sent "
                    "(merge the two people or correct the handle)"
                ),
            )
        except ValueError as err:  # not a user id: the resolver broke its contract
            return await self._finalize(
                inp, delivery, "failed", error=f"x handle @{handle.value} resolved to a bad user id: {err}"
            )
        activity.logger.info("x handle @%s resolved to user id %s", handle.value, user_id)
        return identity

    @activity.defn(name="give_up_delivery")
    async def give_up_delivery(self, inp: DeliverInput) -> DeliverOutput:
        """After retries ran out: mark the delivery failed (a dead letter), never re-send."""
        key = delivery_key(inp.ref.enrollment_id, inp.step.id, inp.attempt)
        async with self.session_factory() as session:
            delivery = (
                await session.execute(select(Delivery).where(Delivery.idempotency_key == key))
            ).scalar_one_or_none()
        if delivery is None:
            delivery = await self._claim(inp, key, str(inp.step.channel))
        if delivery.status in FINAL:
            return self._output(delivery, duplicate=True)
        status = "uncertain" if delivery.status == "sending" else "failed"
        return await self._finalize(
            inp, delivery, status, error=f"gave up after retries: {delivery.error or ''}".strip()
        )

    # ------------------------------------------------------------------ internals
    async def _claim(self, inp: DeliverInput, key: str, channel: str) -> Delivery:
        async with self.session_factory() as session, session.begin():
            await session.execute(
                insert(Delivery)
                .values(
                    idempotency_key=key,
                    enrollment_id=inp.ref.enrollment_id,
                    step_id=inp.step.id,
                    attempt=inp.attempt,
                    channel=channel,
                    action=str(inp.step.action),
                    sender_id=inp.sender_id,
                    variant=inp.variant,
                    status="claimed",
                )
                .on_conflict_do_nothing(index_elements=["idempotency_key"])
            )
            delivery = (
                await session.execute(select(Delivery).where(Delivery.idempotency_key == key).with_for_update())
            ).scalar_one()
        return delivery

    def _message(
        self,
        inp: DeliverInput,
        key: str,
        channel: str,
        sender: SenderAccount,
        target: Identity,
        content: Any,
    ) -> OutboundMessage:
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
        domain = sender.address.rsplit("@", 1)[-1] if "@" in sender.address else "sequencer.local"
        thread = list(inp.thread_message_ids)
        return OutboundMessage(
            channel=channel,
            action=str(inp.step.action),
            idempotency_key=key,
            sender=sender.address,
            sender_name=sender.display_name,
            to=target.value,
            subject=content.subject,
            text=content.text,
            html=html,
            message_id=make_message_id(key, domain) if channel == "email" else None,
            in_reply_to=thread[-1] if thread else None,
            references=thread,
            unsubscribe_url=f"{base}/u/{unsubscribe}",
            footer=self.config.postal_address,
        )

    def _output(self, delivery: Delivery, *, duplicate: bool = False) -> DeliverOutput:
        return DeliverOutput(
            status=delivery.status,
            delivery_id=delivery.id,
            message_id=delivery.message_id,
            provider_message_id=delivery.provider_message_id,
            error=delivery.error,
            duplicate=duplicate,
        )

    async def _finalize(
        self,
        inp: DeliverInput,
        delivery: Delivery,
        status: str,
        *,
        error: str | None = None,
        provider_message_id: str | None = None,
        bounce_identity: Identity | None = None,
    ) -> DeliverOutput:
        now = datetime.now(UTC)
        async with self.session_factory() as session, session.begin():
            values: dict[str, Any] = {"status": status, "error": error}
            if provider_message_id:
                values["provider_message_id"] = provider_message_id
            if status == "sent":
                values["sent_at"] = now
            await session.execute(update(Delivery).where(Delivery.id == delivery.id).values(**values))
            if bounce_identity is not None:
                session.add(
                    Suppression(
                        identity_id=bounce_identity.id,
                        reason="bounce",
                        source=f"delivery {delivery.id}",
                    )
                )
            await append_event(
                session,
                type_=status,
                ref=inp.ref,
                step_id=inp.step.id,
                variant=inp.variant,
                channel=str(inp.step.channel),
                delivery_id=delivery.id,
                occurred_at=inp.now,
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
        delivery.status = status
        delivery.error = error
        delivery.provider_message_id = provider_message_id or delivery.provider_message_id
        activity.logger.info("delivery %s: %s %s", delivery.idempotency_key, status, error or "")
        return self._output(delivery)
