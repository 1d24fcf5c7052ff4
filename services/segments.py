"""Rule-based segments: parsed and compiled once, stored with a version.

A rule segment is evaluated when an audience is enrolled (it is a live filter); a
changed rule bumps the version so that audits can tell which rule enrolled whom. A rule
that differs only in spacing, quote style or keyword case is the same rule (same version).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select

from db.session import SessionFactory
from db.tables import Person, Segment
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
