"""The people CSV import: upsert people and identities, snapshot a static segment.

Every bad line is reported with its line number (the physical line of the file where
the record starts, the header being line 1) and every reason it was refused, and
changes nothing; every good line lands (each row runs in its own savepoint; batches
commit every few hundred rows so that 100,000 rows import in one go). A row matches an existing person through
any of its identities, so importing the same file again changes nothing. Known columns
are matched case-insensitively ("Email", "First Name"); other columns become custom
fields under their own name.

The segment named on the command line becomes a snapshot of exactly this import's good
rows (an existing static segment of that name is replaced), as v1's static segments.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from db.session import SessionFactory
from db.tables import Identity, Person, Segment, SegmentMember, Suppression
from services.identities import COLUMN_CHANNEL
from services.person_row import PERSON_COLUMNS, PersonRow, RowProblems

BATCH = 500


@dataclass
class RowError:
    """A line that was not imported, and why."""

    line: int
    reason: str


@dataclass
class ImportReport:
    """What the import did."""

    rows: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    errors: list[RowError] = field(default_factory=list)
    segment_id: int | None = None
    members: int = 0
    #: Members who must not be contacted: suppressed, or (for someone deleted and imported
    #: again) with an identity suppressed before (migration 0005's triggers re-apply it).
    suppressed: int = 0


class _BadRow(Exception):
    pass


def _header(cells: list[str]) -> list[str]:
    """Known columns match case-insensitively ("Email", "First Name"); others keep their name."""
    known = set(COLUMN_CHANNEL) | set(PERSON_COLUMNS)
    out = []
    for cell in cells:
        name = cell.strip()
        canonical = name.lower().replace(" ", "_").replace("-", "_")
        out.append(canonical if canonical in known else name)
    return out


async def _upsert(
    session: AsyncSession, person_values: dict[str, Any], identities: dict[str, str], custom: dict[str, str]
) -> tuple[int, str]:
    owners = (
        await session.execute(
            select(Identity.channel, Identity.value, Identity.person_id).where(
                Identity.value.in_(list(identities.values()))
            )
        )
    ).all()
    owned = {(c, v): pid for c, v, pid in owners if identities.get(c) == v}
    people_ids = set(owned.values())
    if len(people_ids) > 1:
        detail = ", ".join(f"{c} {v} belongs to person {pid}" for (c, v), pid in sorted(owned.items()))
        raise _BadRow(f"identities belong to different people: {detail}")
    if people_ids:
        pid = people_ids.pop()
        person = await session.get(Person, pid)
        assert person is not None
        # an identity on a channel this person already has with another value
        current = dict(
            (await session.execute(select(Identity.channel, Identity.value).where(Identity.person_id == pid))).all()
        )
        changed = False
        for key, value in person_values.items():
            if getattr(person, key) != value:
                setattr(person, key, value)
                changed = True
        merged = {**(person.fields or {}), **custom}
        if merged != (person.fields or {}):
            person.fields = merged
            changed = True
        for channel, value in identities.items():
            if (channel, value) not in owned:
                if channel in current:
                    matched = ", ".join(f"{c} {v!r}" for (c, v) in sorted(owned))
                    raise _BadRow(
                        f"{matched} belongs to person {pid}, who already has {channel} {current[channel]!r}; "
                        f"this row says {value!r} (an identity owned by another person?)"
                    )
                session.add(Identity(person_id=pid, channel=channel, value=value))
                changed = True
        await session.flush()
        return pid, "updated" if changed else "unchanged"
    person = Person(fields=custom, **person_values)
    session.add(person)
    await session.flush()
    for channel, value in identities.items():
        session.add(Identity(person_id=person.id, channel=channel, value=value))
    await session.flush()
    return int(person.id), "created"


async def import_people(
    session_factory: SessionFactory,
    path: Path,
    segment: str,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> ImportReport:
    """Import a CSV; see the module docstring for the rules."""
    report = ImportReport()
    if not segment.strip():
        raise ValueError("--segment must not be empty")
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as err:
        raise ValueError(f"{path}: {err}") from None
    with handle:
        reader = csv.reader(handle)
        try:
            header = _header(next(reader))
        except StopIteration:
            raise ValueError(f"{path}: the file is empty (a header row is required)") from None
        except csv.Error as err:
            raise ValueError(f"{path}: line 1: {err}") from None
        if not any(h in COLUMN_CHANNEL for h in header):
            raise ValueError(f"{path}: the header names no identity column ({', '.join(COLUMN_CHANNEL)})")
        dupes = {h for h in header if header.count(h) > 1}
        if dupes:
            raise ValueError(f"{path}: duplicate header column(s) {sorted(dupes)}")
        # (line where the record starts, cells): a quoted cell may span several lines
        rows: list[tuple[int, list[str]]] = []
        while True:
            line = reader.line_num + 1
            try:
                cells = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                raise ValueError(f"{path}: line {line}: {err}") from None
            rows.append((line, cells))
    total = len(rows)
    members: list[int] = []
    async with session_factory() as session, session.begin():
        seg = (await session.execute(select(Segment).where(Segment.name == segment))).scalar_one_or_none()
        if seg is not None and seg.kind != "static":
            raise ValueError(f"segment {segment!r} is a rule segment; import into another name")
    for start in range(0, total, BATCH):
        async with session_factory() as session, session.begin():
            for line, cells in rows[start : start + BATCH]:
                if not any(c.strip() for c in cells):
                    continue
                report.rows += 1
                if len(cells) != len(header):
                    report.errors.append(RowError(line, f"expected {len(header)} columns, found {len(cells)}"))
                    continue
                try:
                    row = PersonRow.from_cells(dict(zip(header, cells, strict=True)))
                    async with session.begin_nested():
                        pid, outcome = await _upsert(session, row.person_values(), row.identities, row.custom)
                except (_BadRow, RowProblems) as err:
                    report.errors.append(RowError(line, str(err)))
                    continue
                except DBAPIError as err:  # the savepoint rolled the row back; the batch goes on
                    detail = str(err.orig).splitlines()[0] if err.orig else str(err)
                    report.errors.append(RowError(line, f"database refused the row: {detail}"))
                    continue
                members.append(pid)
                setattr(report, outcome, getattr(report, outcome) + 1)
        if progress:
            progress(min(start + BATCH, total), total)
    async with session_factory() as session, session.begin():
        await session.execute(
            insert(Segment).values(name=segment, kind="static").on_conflict_do_nothing(index_elements=["name"])
        )
        seg = (await session.execute(select(Segment).where(Segment.name == segment).with_for_update())).scalar_one()
        current = set(
            (await session.execute(select(SegmentMember.person_id).where(SegmentMember.segment_id == seg.id))).scalars()
        )
        wanted = set(members)
        if current != wanted:
            await session.execute(delete(SegmentMember).where(SegmentMember.segment_id == seg.id))
            if wanted:
                await session.execute(
                    insert(SegmentMember).values([{"segment_id": seg.id, "person_id": p} for p in sorted(wanted)])
                )
        report.segment_id = int(seg.id)
        report.members = len(wanted)
        report.suppressed = await _count_suppressed(session, sorted(wanted))
    return report


async def _count_suppressed(session: AsyncSession, people: list[int]) -> int:
    """How many of `people` are suppressed (as a person, or by any identity)."""
    if not people:
        return 0
    query = (
        select(func.count(func.distinct(Person.id)))
        .select_from(Person)
        .outerjoin(Identity, Identity.person_id == Person.id)
        .join(Suppression, (Suppression.person_id == Person.id) | (Suppression.identity_id == Identity.id))
        .where(Person.id.in_(people))
    )
    return int((await session.execute(query)).scalar_one())
