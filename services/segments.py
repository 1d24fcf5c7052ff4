"""Rule-based segments: parsed and compiled once, stored with a version.

A rule segment is evaluated when an audience is enrolled (it is a live filter); a
changed rule bumps the version so that audits can tell which rule enrolled whom. A rule
that differs only in spacing, quote style or keyword case is the same rule (same version).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select

from db.session import SessionFactory
from db.tables import Person, Segment, SegmentMember
from services.segment_rules import RuleSyntaxError, canonical_rule, compile_rule


@dataclass
class RuleSegment:
    """The stored segment and how many people match it now."""

    name: str
    version: int
    size: int


def _same_rule(stored: str | None, rule: str) -> bool:
    if stored is None:
        return False
    try:
        return canonical_rule(stored) == canonical_rule(rule)
    except RuleSyntaxError:  # stored under an older grammar: compare the text
        return stored == rule


async def create_rule_segment(session_factory: SessionFactory, name: str, rule: str) -> RuleSegment:
    """Create or update a rule segment (RuleSyntaxError names the position of a bad rule)."""
    condition = compile_rule(rule)  # raises before anything is written
    async with session_factory() as session, session.begin():
        segment = (
            await session.execute(select(Segment).where(Segment.name == name).with_for_update())
        ).scalar_one_or_none()
        if segment is None:
            segment = Segment(name=name, kind="rule", rule=rule, version=1)
            session.add(segment)
        elif segment.kind != "rule":
            raise ValueError(f"segment {name!r} is a static (imported) segment; pick another name")
        elif not _same_rule(segment.rule, rule):
            segment.rule = rule
            segment.version += 1
        size = (await session.execute(select(func.count()).select_from(Person).where(condition))).scalar_one()
    return RuleSegment(name=name, version=segment.version, size=int(size))


async def segment_page(
    session_factory: SessionFactory, segment_name: str, after: int, limit: int
) -> tuple[list[Person], Segment]:
    """One page of a segment's people (static snapshot or live rule), by person id."""
    async with session_factory() as session:
        segment = (await session.execute(select(Segment).where(Segment.name == segment_name))).scalar_one_or_none()
        if segment is None:
            known = (await session.execute(select(Segment.name).order_by(Segment.name))).scalars()
            raise LookupError(f"unknown segment {segment_name!r} (known: {', '.join(known) or 'none'})")
        query = select(Person).where(Person.id > after).order_by(Person.id).limit(limit)
        if segment.kind == "rule":
            query = query.where(compile_rule(segment.rule or ""))
        else:
            query = query.where(
                Person.id.in_(select(SegmentMember.person_id).where(SegmentMember.segment_id == segment.id))
            )
        people = list((await session.execute(query)).scalars())
    return people, segment


async def segment_size(session_factory: SessionFactory, segment: Segment) -> int:
    """How many people the segment holds right now."""
    async with session_factory() as session:
        if segment.kind == "rule":
            query = select(func.count()).select_from(Person).where(compile_rule(segment.rule or ""))
        else:
            query = select(func.count()).where(SegmentMember.segment_id == segment.id)
        return int((await session.execute(query)).scalar_one())
