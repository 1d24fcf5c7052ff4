"""The sender circuit breaker: our own account's problems pause the sender, never fail leads.

Why: an SMTP 535 or an HTTP 401 from X or the relay says *our* credentials or
configuration are wrong; a bounce rate over the threshold or a run of 421/429 answers says
the account is in trouble with its provider. Sending on would fail every lead that reaches
the sender in that moment (or hurt its reputation further), so the sender is paused with
the kind and the reason, the governor grants it no slots, and the leads wait for it.

Kinds and how each closes:

- `manual` (`senders pause`): until `senders resume`.
- `auth` (535/401) and `throttle` (`throttle_strikes` 421/429 in a row): until
  `senders resume`, or after `paused_until` (the cool-down) one send is let through as a
  probe; its success closes the breaker, another refusal opens it for a new cool-down.
- `bounce_rate` (over `bounce_rate_threshold` of the last `bounce_window` sends, counted
  from the last resume, once `bounce_min_sends` are in): until `senders resume`. Bounces
  count whenever they arrive: the SMTP server's refusal during the send, and the later ones
  (a DSN in a connected mailbox, a provider's webhook) through `record_late_bounce`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import CTE, Select, and_, bindparam, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.dml import Update

from db.session import SessionFactory
from db.statements import params, table_of, update_if
from db.tables import Delivery, Event, SenderAccount
from models.outcomes import DeliveryStatus, EventType

if TYPE_CHECKING:
    from settings import Settings

log = logging.getLogger("sequencer.breaker")

KINDS = ("manual", "auth", "bounce_rate", "throttle")


@dataclass(frozen=True)
class BreakerConfig:
    """When the breaker opens and for how long (SENDER_* settings)."""

    cooldown: timedelta = timedelta(minutes=10)
    bounce_rate_threshold: float = 0.05
    bounce_window: int = 100
    bounce_min_sends: int = 20
    throttle_strikes: int = 5

    @classmethod
    def from_settings(cls, settings: Settings) -> BreakerConfig:
        """The SENDER_* settings: the one place they become a config (sends, inbound, providers)."""
        return cls(
            cooldown=timedelta(seconds=settings.sender_breaker_cooldown_seconds),
            bounce_rate_threshold=settings.sender_bounce_rate_threshold,
            bounce_min_sends=settings.sender_bounce_min_sends,
            throttle_strikes=settings.sender_throttle_strikes,
        )


def is_paused(acct: SenderAccount, now: datetime) -> bool:
    """Whether the breaker holds this sender at `now` (past `paused_until` a probe may go)."""
    return acct.paused_at is not None and (acct.paused_until is None or acct.paused_until > now)


def describe(acct: SenderAccount) -> str:
    """One line for `senders list`, `status` and /healthz: `active` or why and until when."""
    if acct.paused_at is None:
        return "active"
    until = f", probe after {acct.paused_until:%Y-%m-%d %H:%M} UTC" if acct.paused_until else ""
    return f"paused ({acct.paused_kind}) since {acct.paused_at:%Y-%m-%d %H:%M} UTC{until}: {acct.paused_reason or ''}"


async def pause(
    session: AsyncSession, sender_id: int, kind: str, reason: str, *, now: datetime, until: datetime | None
) -> None:
    """Open the breaker (again): paused now, with the kind, reason and cool-down end."""
    if kind not in KINDS:
        raise ValueError(f"breaker kind {kind!r} is not one of {', '.join(KINDS)}")
    channel = (
        await session.execute(
            update(SenderAccount)
            .where(SenderAccount.id == sender_id)
            .values(paused_at=now, paused_kind=kind, paused_reason=reason[:2000], paused_until=until)
            .returning(SenderAccount.channel)
        )
    ).scalar_one_or_none()
    if channel is not None:  # the audit trail: who paused which sender, why, until when
        session.add(
            Event(
                type=EventType.SENDER_PAUSED,
                occurred_at=now,
                channel=channel,
                data={
                    "sender_id": sender_id,
                    "kind": kind,
                    "reason": reason[:500],
                    "until": until.isoformat() if until else None,
                },
            )
        )


async def record_success(session: AsyncSession, sender_id: int, now: datetime) -> bool:
    """A send went through: reset the throttle count; a probe after the cool-down closes the breaker.

    Returns whether the breaker was closed. One statement (`success_writes`).
    """
    return bool((await session.execute(_RECORD_SUCCESS, success_params(sender_id, now))).scalar_one())


def success_writes(after: CTE | None = None, prefix: str = "b_") -> tuple[Update, Update]:
    """`record_success`'s two UPDATEs, for one statement: the close (RETURNING the id) and the reset.

    A probe after the cool-down closes the breaker and clears the throttle count; any other
    sender with a count gets it cleared. The two never match the same row (one statement may
    not change a row twice), and a sender with nothing to reset is not touched at all, so
    ordinary sends do not contend with the governor's sender locks. Parameters:
    `success_params`; `after`: only if that part of the statement returned its row
    (`db/statements.py`).
    """
    senders = table_of(SenderAccount)
    mine = senders.c.id == bindparam(prefix + "sender")
    now = bindparam(prefix + "now", type_=senders.c.paused_until.type)
    probe = and_(senders.c.paused_at.is_not(None), senders.c.paused_until.is_not(None), senders.c.paused_until <= now)
    closes = (
        update(senders)
        .where(mine, probe)
        .values(
            paused_at=None,
            paused_kind=None,
            paused_reason=None,
            paused_until=None,
            breaker_since=now,
            throttle_strikes=0,
        )
        .returning(senders.c.id)
    )
    resets = update(senders).where(mine, ~probe, senders.c.throttle_strikes > 0).values(throttle_strikes=0)
    return update_if(closes, after), update_if(resets, after)


def success_params(sender_id: int, now: datetime, prefix: str = "b_") -> dict[str, Any]:
    """The parameters of `success_writes`."""
    return params(prefix, {"sender": sender_id, "now": now})


def _record_success() -> Select[Any]:
    closes, resets = success_writes()
    return select(func.count()).select_from(closes.cte("closes")).add_cte(resets.cte("resets"))


_RECORD_SUCCESS = _record_success()


async def record_throttle(
    session: AsyncSession, sender_id: int, reason: str, config: BreakerConfig, now: datetime
) -> bool:
    """One more 421/429 in a row; at `throttle_strikes` the breaker opens. Returns whether it did."""
    strikes = (
        await session.execute(
            update(SenderAccount)
            .where(SenderAccount.id == sender_id)
            .values(throttle_strikes=SenderAccount.throttle_strikes + 1)
            .returning(SenderAccount.throttle_strikes)
        )
    ).scalar_one_or_none()
    if strikes is None or strikes < config.throttle_strikes:
        return False
    await pause(
        session,
        sender_id,
        "throttle",
        f"{strikes} throttling answers in a row, the last: {reason}",
        now=now,
        until=now + config.cooldown,
    )
    await session.execute(update(SenderAccount).where(SenderAccount.id == sender_id).values(throttle_strikes=0))
    return True


async def check_bounce_rate(session: AsyncSession, sender_id: int, config: BreakerConfig, now: datetime) -> bool:
    """After a bounce: open the breaker if the sender's recent bounce rate passes the threshold.

    The sender's row is locked first: bounces recorded at the same time (a provider's batch,
    a DSN while a send is refused) are counted one after the other, each seeing the others
    once they commit, so two of them cannot each miss the one that crosses the threshold.
    The window holds the sends made since the last resume (by when they were sent; a send
    the server refused at once has no `sent_at`, its outcome's time stands for it), so a
    late bounce of mail sent before the resume does not count against the list checked since.
    """
    acct = (
        await session.execute(
            select(SenderAccount)
            .where(SenderAccount.id == sender_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    ).scalar_one_or_none()
    if acct is None or acct.paused_at is not None:
        return False
    query = select(Delivery.status).where(
        Delivery.sender_id == sender_id,
        Delivery.status.in_((DeliveryStatus.SENT, DeliveryStatus.BOUNCED, DeliveryStatus.UNCERTAIN)),
    )
    if acct.breaker_since is not None:
        query = query.where(func.coalesce(Delivery.sent_at, Delivery.updated_at) >= acct.breaker_since)
    recent = list((await session.execute(query.order_by(Delivery.id.desc()).limit(config.bounce_window))).scalars())
    bounced = sum(1 for s in recent if s == DeliveryStatus.BOUNCED)
    if len(recent) < config.bounce_min_sends or bounced / len(recent) <= config.bounce_rate_threshold:
        return False
    await pause(
        session,
        sender_id,
        "bounce_rate",
        f"{bounced} of the last {len(recent)} sends bounced ({bounced / len(recent):.0%}, "
        f"over {config.bounce_rate_threshold:.0%}): check the list before resuming",
        now=now,
        until=None,
    )
    return True


async def record_late_bounce(
    session: AsyncSession, delivery_id: int, error: str, config: BreakerConfig, now: datetime
) -> bool:
    """A bounce reported after the send (a DSN, a provider's webhook): sent -> bounced, then the
    sender's bounce rate is checked as for a refusal during the send, in the same transaction.

    A compare-and-set: only the transition counts, so a report read twice (or by two sources)
    counts once, and a row in any other state stays. Returns whether the row was marked.
    """
    marked = (
        await session.execute(
            update(Delivery)
            .where(Delivery.id == delivery_id, Delivery.status == DeliveryStatus.SENT)
            .values(status=DeliveryStatus.BOUNCED, error=error[:2000])
            .returning(Delivery.sender_id)
        )
    ).first()
    if marked is None:
        return False
    if marked.sender_id is not None and await check_bounce_rate(session, marked.sender_id, config, now):
        log.warning(
            "sender %s paused: bounce rate over threshold (a later bounce of delivery %s)",
            marked.sender_id,
            delivery_id,
        )
    return True


async def set_paused(session_factory: SessionFactory, sender_id: int, reason: str, now: datetime) -> SenderAccount:
    """`senders pause ID`: hold the sender until resumed (ValueError names an unknown id)."""
    async with session_factory() as session, session.begin():
        acct = await session.get(SenderAccount, sender_id)
        if acct is None:
            raise ValueError(f"sender {sender_id}: no such sender account (see `senders list`)")
        await pause(session, sender_id, "manual", reason or "paused by hand", now=now, until=None)
        await session.refresh(acct)
        return acct


async def resume(session_factory: SessionFactory, sender_id: int, now: datetime) -> SenderAccount:
    """`senders resume ID`: close the breaker; the bounce-rate window starts again now."""
    async with session_factory() as session, session.begin():
        acct = await session.get(SenderAccount, sender_id)
        if acct is None:
            raise ValueError(f"sender {sender_id}: no such sender account (see `senders list`)")
        await session.execute(
            update(SenderAccount)
            .where(SenderAccount.id == sender_id)
            .values(
                paused_at=None,
                paused_kind=None,
                paused_reason=None,
                paused_until=None,
                throttle_strikes=0,
                breaker_since=now,
            )
        )
        await session.refresh(acct)
        return acct


async def paused_senders(
    session: AsyncSession, now: datetime | None, channel: str | None = None
) -> list[SenderAccount]:
    """Active sender accounts the breaker holds at `now` (None: with an open breaker at all,
    including those whose cool-down passed and that wait for their probe), optionally of one channel."""
    query = select(SenderAccount).where(SenderAccount.active.is_(True), SenderAccount.paused_at.is_not(None))
    if now is not None:
        query = query.where(or_(SenderAccount.paused_until.is_(None), and_(SenderAccount.paused_until > now)))
    if channel:
        query = query.where(SenderAccount.channel == channel)
    return list((await session.execute(query.order_by(SenderAccount.id))).scalars())
