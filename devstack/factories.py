"""Rows for tests, benchmarks and the demo: people, identities, senders, sequences.

One place that knows how a person with identities, a sender account, a stored sequence
version or a segment of many people is written, so the tests (`tests/engine_harness.py`)
and the benchmarks (`bench/`) build their data the same way. Everything goes through the
real schema (the ORM or plain SQL on the same tables); nothing here is used by production
code paths.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import select, text

from db.session import SessionFactory
from db.tables import Identity, Person, SenderAccount, Sequence, SequenceVersion
from models.enrollment import SequenceRef
from models.sequence import SequenceDefinition
from models.sequence_checks import validate_definition
from services.mail_urls import connection_flags
from services.senders import add_sender
from settings import Settings

#: One sender per channel with the caps `all_senders` gives them (practically uncapped).
DEFAULT_SENDERS: Mapping[str, str] = {
    "email": "sales@acme.test",
    "x": "900",
    "linkedin": "https://www.linkedin.com/in/seller",
    "xmtp": "0x" + "ab" * 20,
}


async def make_person(
    sf: SessionFactory,
    *,
    email: str | None = None,
    x: str | None = None,
    linkedin: str | None = None,
    xmtp: str | None = None,
    first_name: str | None = "Ada",
    last_name: str | None = "Lovelace",
    company: str = "Acme",
    timezone: str = "UTC",
    fields: dict[str, Any] | None = None,
    identities: Mapping[str, str] | None = None,
) -> int:
    """Insert a person with an identity per channel given; the person's id.

    `identities`: identities of other kinds (kind -> value), e.g. `{"x_handle": "ada_l"}`.
    """
    async with sf() as s, s.begin():
        person = Person(
            first_name=first_name,
            last_name=last_name,
            company=company,
            timezone=timezone,
            fields=fields or {},
        )
        s.add(person)
        await s.flush()
        given = {"email": email, "x": x, "linkedin": linkedin, "xmtp": xmtp, **(identities or {})}
        for kind, value in given.items():
            if value:
                s.add(Identity(person_id=person.id, channel=kind, value=value))
        return int(person.id)


async def make_sender_row(
    sf: SessionFactory,
    channel: str,
    address: str,
    *,
    per_hour: int = 1000,
    per_day: int = 10000,
    spacing: float = 0.0,
    jitter: float = 0.0,
    **columns: Any,
) -> SenderAccount:
    """Insert a sender account (generous caps unless given); the row. `columns`: other SenderAccount fields."""
    async with sf() as s, s.begin():
        acct = SenderAccount(
            channel=channel,
            address=address,
            per_hour=per_hour,
            per_day=per_day,
            min_spacing_seconds=spacing,
            jitter_seconds=jitter,
            **columns,
        )
        s.add(acct)
        await s.flush()
    return acct


async def make_sender(sf: SessionFactory, channel: str, address: str, **options: Any) -> int:
    """Insert a sender account (`make_sender_row`'s options); its id."""
    return int((await make_sender_row(sf, channel, address, **options)).id)


async def add_email_sender(
    sf: SessionFactory,
    settings: Settings,
    address: str,
    env: Mapping[str, str] | None = None,
    *,
    per_hour: int | None = 1000,
    per_day: int | None = 10000,
    spacing: float | None = 0.0,
    jitter: float | None = 0.0,
    **flags: Any,
) -> int:
    """An email sender added (or updated) as `senders add` does it, with its connection flags; its id.

    `flags`: the CLI's (`smtp=`, `imap=`, `oauth_refresh_token_env=`, `no_smtp=` ...); `env`
    is where the `*_env` flags read their secrets. Secrets are stored with `settings`' key.
    Caps default to generous ones; None leaves them as `senders add` would (channel default,
    or unchanged on an update).
    """
    parsed = connection_flags(dict(env or {}), **flags)
    acct = await add_sender(
        sf,
        channel="email",
        address=address,
        per_hour=per_hour,
        per_day=per_day,
        spacing=spacing,
        jitter=jitter,
        smtp=parsed.smtp,
        imap=parsed.imap,
        oauth=parsed.oauth,
        remove=parsed.remove,
        settings=settings,
    )
    return int(acct.id)


async def all_senders(sf: SessionFactory) -> dict[str, int]:
    """One sender per channel (`DEFAULT_SENDERS`), uncapped for practical purposes; channel -> id."""
    return {channel: await make_sender(sf, channel, address) for channel, address in DEFAULT_SENDERS.items()}


async def store_version(sf: SessionFactory, raw: dict[str, Any] | str) -> tuple[SequenceRef, SequenceDefinition]:
    """Validate and store a sequence version directly (YAML text or a dict); its ref and definition.

    The CLI's path (`services.sequence_store.create_version`, from a file) has its own tests;
    this one skips the file so a test can hold its sequence inline.
    """
    data = yaml.safe_load(raw) if isinstance(raw, str) else raw
    defn = validate_definition(data)
    digest = hashlib.sha256(json.dumps(defn.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
    async with sf() as s, s.begin():
        seq = (await s.execute(select(Sequence).where(Sequence.name == defn.name))).scalar_one_or_none()
        if seq is None:
            seq = Sequence(name=defn.name)
            s.add(seq)
            await s.flush()
        count = len((await s.execute(select(SequenceVersion.id).where(SequenceVersion.sequence_id == seq.id))).all())
        version = SequenceVersion(
            sequence_id=seq.id,
            version=count + 1,
            content_hash=digest,
            definition=defn.model_dump(mode="json"),
            source=json.dumps(data),
        )
        s.add(version)
        await s.flush()
        ref = SequenceRef(
            sequence_id=seq.id,
            sequence_name=defn.name,
            version_id=version.id,
            version=version.version,
        )
    return ref, defn


def sequence_file(folder: Path, name: str, steps: list[dict[str, Any]], **extra: Any) -> Path:
    """Write a sequence file (JSON, which is YAML) for `sequences add` / `create_version`; its path.

    `extra`: top-level keys (default `stop_on_reply: true`).
    """
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"name": name, "steps": steps, "stop_on_reply": True, **extra}))
    return path


async def seed_people(
    sf: SessionFactory,
    n: int,
    segment: str,
    *,
    email_prefix: str | None = None,
    domain: str = "lead.test",
    companies: int | None = None,
    fields: dict[str, Any] | None = None,
) -> list[int]:
    """Insert n people with an email identity each, in a new static segment `segment` (bulk SQL).

    Person i is `Lead<i>` at `Co<i>` (or `Co<i % companies>`, so colleagues share a company);
    the address is `<email_prefix><id>@<domain>` (prefix default: the segment's name).
    """
    async with sf() as s, s.begin():
        ids = list(
            (
                await s.execute(
                    text(
                        "INSERT INTO persons (first_name, company, timezone, fields) "
                        "SELECT 'Lead' || g, 'Co' || CASE WHEN :k > 0 THEN g % :k ELSE g END, 'UTC', "
                        "CAST(:fields AS jsonb) FROM generate_series(1, :n) g RETURNING id"
                    ),
                    {"n": n, "k": companies or 0, "fields": json.dumps(fields or {})},
                )
            ).scalars()
        )
        await s.execute(
            text(
                "INSERT INTO identities (person_id, channel, value) "
                "SELECT id, 'email', :prefix || id || '@' || :domain FROM unnest(CAST(:ids AS bigint[])) id"
            ),
            {"ids": ids, "prefix": segment if email_prefix is None else email_prefix, "domain": domain},
        )
        seg = (
            await s.execute(
                text("INSERT INTO segments (name, kind) VALUES (:name, 'static') RETURNING id"), {"name": segment}
            )
        ).scalar_one()
        await s.execute(
            text(
                "INSERT INTO segment_members (segment_id, person_id) "
                "SELECT :seg, id FROM unnest(CAST(:ids AS bigint[])) id"
            ),
            {"seg": seg, "ids": ids},
        )
    return ids
