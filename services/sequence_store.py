"""Sequence files in, immutable versions out.

Editing a sequence in place made v1's in-flight state tricky. Here a file is parsed,
validated (graph and templates) and stored as a new version only when its canonical
content changed; the same content, however reformatted, is the same version, and
nothing ever updates a stored version. Running enrollments carry their version's
definition, so a new version never touches them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert

from db.session import SessionFactory
from db.tables import Sequence, SequenceVersion
from models.sequence import SequenceDefinition
from models.sequence_checks import (
    SequenceIssue,
    SequenceValidationError,
    check_definition,
    lenient_definition,
)
from services.templating import check_definition_templates


@dataclass
class CreatedVersion:
    """What `create_version` did."""

    sequence_id: int
    name: str
    version: int
    version_id: int
    created: bool


@dataclass
class StoredVersion:
    """A stored version with its parsed definition."""

    sequence_id: int
    name: str
    version: int
    version_id: int
    definition: SequenceDefinition


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping (YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: SafeLoader reports it below
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"duplicate key(s) {dupes}")
    return dict(pairs)


def load_sequence_file(path: Path) -> tuple[dict[str, Any], str]:
    """Parse YAML or JSON; syntax errors name the file, line and column."""
    try:
        source = path.read_text(encoding="utf-8")
    except OSError as err:
        raise SequenceValidationError([SequenceIssue(rule="file", message=f"{path}: {err}")]) from None
    try:
        if path.suffix.lower() == ".json" or source.lstrip().startswith("{"):
            data = json.loads(source, object_pairs_hook=_json_object)
        else:
            data = yaml.load(source, Loader=_UniqueKeyLoader)  # a SafeLoader
    except json.JSONDecodeError as err:
        raise SequenceValidationError(
            [SequenceIssue(rule="syntax", message=f"{path}:{err.lineno}:{err.colno}: {err.msg}")]
        ) from None
    except ValueError as err:  # a duplicate key in JSON
        raise SequenceValidationError([SequenceIssue(rule="syntax", message=f"{path}: {err}")]) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err)
        context = getattr(err, "context", None)
        problem = f"{context}: {problem}" if context and "duplicate" in str(problem) else problem
        raise SequenceValidationError([SequenceIssue(rule="syntax", message=f"{where}: {problem}")]) from None
    if not isinstance(data, dict):
        raise SequenceValidationError(
            [
                SequenceIssue(
                    rule="syntax",
                    message=f"{path}: the top level must be a mapping with name and steps",
                )
            ]
        )
    return data, source


def validate_file(path: Path) -> SequenceDefinition:
    """Graph rules and template syntax, all problems at once."""
    data, _ = load_sequence_file(path)
    return validate_data(data)


def validate_data(data: dict[str, Any]) -> SequenceDefinition:
    """Graph rules and template syntax of a parsed file; every problem in one error."""
    defn, issues = check_definition(data)
    # with field or graph errors, still check the templates of every step that parsed,
    # so that one run lists everything
    candidate = defn if defn is not None else lenient_definition(data)[0]
    for p in check_definition_templates(candidate):
        where = f"variant {p.variant!r} {p.field}" if p.variant else p.field
        issues.append(SequenceIssue(step=p.step, rule="template", message=f"{where}: {p.message}"))
    if issues or defn is None:
        raise SequenceValidationError(issues)
    return defn


def content_hash(defn: SequenceDefinition) -> str:
    """sha256 of the canonical JSON: reformatting or reordering keys keeps the hash."""
    canonical = json.dumps(defn.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


async def create_version(session_factory: SessionFactory, path: Path) -> CreatedVersion:
    """Validate and store a new immutable version unless the same content exists."""
    data, source = load_sequence_file(path)
    defn = validate_data(data)
    digest = content_hash(defn)
    async with session_factory() as session, session.begin():
        await session.execute(insert(Sequence).values(name=defn.name).on_conflict_do_nothing(index_elements=["name"]))
        seq = (await session.execute(select(Sequence).where(Sequence.name == defn.name).with_for_update())).scalar_one()
        existing = (
            await session.execute(
                select(SequenceVersion).where(
                    SequenceVersion.sequence_id == seq.id, SequenceVersion.content_hash == digest
                )
            )
        ).scalar_one_or_none()
        if existing is not None:
            return CreatedVersion(seq.id, seq.name, existing.version, existing.id, False)
        latest = (
            await session.execute(
                select(func.coalesce(func.max(SequenceVersion.version), 0)).where(SequenceVersion.sequence_id == seq.id)
            )
        ).scalar_one()
        version = SequenceVersion(
            sequence_id=seq.id,
            version=int(latest) + 1,
            content_hash=digest,
            definition=defn.model_dump(mode="json"),
            source=source,
        )
        session.add(version)
        await session.flush()
        return CreatedVersion(seq.id, seq.name, version.version, version.id, True)


async def get_version(session_factory: SessionFactory, name: str, version: int | None = None) -> StoredVersion:
    """A stored version (the latest when `version` is None); LookupError names what is missing."""
    async with session_factory() as session:
        seq = (await session.execute(select(Sequence).where(Sequence.name == name))).scalar_one_or_none()
        if seq is None:
            known = (await session.execute(select(Sequence.name).order_by(Sequence.name))).scalars()
            raise LookupError(f"unknown sequence {name!r} (known: {', '.join(known) or 'none'})")
        query = select(SequenceVersion).where(SequenceVersion.sequence_id == seq.id)
        if version is None:
            query = query.order_by(SequenceVersion.version.desc()).limit(1)
        else:
            query = query.where(SequenceVersion.version == version)
        row = (await session.execute(query)).scalar_one_or_none()
        if row is None:
            raise LookupError(f"sequence {name!r} has no version {version}")
    return StoredVersion(seq.id, seq.name, row.version, row.id, SequenceDefinition.model_validate(row.definition))
