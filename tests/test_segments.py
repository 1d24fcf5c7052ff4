"""Rule segments: the `--where` language, evaluated by a real PostgreSQL.

Why: a rule picks who gets contacted, so every operator must mean what it says on
built-in columns, identities and custom JSONB fields (numbers compared as numbers), a
bad rule must say where it is wrong, and no rule text may ever reach the SQL text: an
injection attempt is either a syntax error or a literal value, and the table survives.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.dialects import postgresql
from typer.testing import CliRunner

from db.session import SessionFactory, make_engine, make_session_factory
from db.tables import Identity, Person, Segment
from services.segment_rules import RuleSyntaxError, canonical_rule, compile_rule, evaluate_rule, parse_rule
from services.segments import create_rule_segment

PEOPLE: list[dict[str, Any]] = [
    {
        "first_name": "Ada",
        "last_name": "Lovelace",
        "company": "Acme",
        "fields": {"employees": 250, "role": "CEO", "city": "Berlin", "vip": False},
        "ids": {"email": "ada@acme.test"},
    },
    {
        "first_name": "Grace",
        "last_name": "Hopper",
        "company": "Globex",
        "fields": {"employees": "1200", "role": "CTO", "city": "New York", "vip": True},
        "ids": {"email": "grace@globex.test", "x_handle": "@grace"},
    },
    {
        "first_name": "Alan",
        "last_name": "Turing",
        "company": "O'Brien & Sons",
        "fields": {"employees": 40, "role": "Engineer", "city": ""},
        "ids": {"x": "12345"},
    },
    {
        "first_name": "Edsger",
        "last_name": "Dijkstra",
        "company": None,
        "fields": {"employees": "n/a", "notes": "50% off, first_name = 'x'"},
        "ids": {"linkedin": "https://www.linkedin.com/in/edsger"},
    },
    {
        "first_name": "Barbara",
        "last_name": "Liskov",
        "company": "acme",
        "fields": {"employees": 9.5, "city": "berlin-mitte"},
        "ids": {"email": "barbara@acme.test"},
    },
    {
        "first_name": "Ken",
        "last_name": 'Back\\slash "Q"',
        "company": "x' OR 1=1 --",
        "fields": {"employees": "-3", "role": "'; DROP TABLE persons; --"},
        "ids": {},
    },
]
EVERYONE = {p["first_name"] for p in PEOPLE}


async def _seed(sf: SessionFactory) -> dict[int, str]:
    names: dict[int, str] = {}
    async with sf() as s, s.begin():
        for p in PEOPLE:
            person = Person(
                first_name=p["first_name"], last_name=p["last_name"], company=p["company"], fields=p["fields"]
            )
            s.add(person)
            await s.flush()
            names[person.id] = p["first_name"]
            for channel, value in p["ids"].items():
                s.add(Identity(person_id=person.id, channel=channel, value=value))
    return names


async def _match(sf: SessionFactory, names: dict[int, str], expr: str) -> set[str]:
    async with sf() as s:
        return {names[i] for i in await evaluate_rule(s, expr)}


async def _table_state(sf: SessionFactory) -> tuple[str | None, int]:
    async with sf() as s:
        regclass = (await s.execute(text("SELECT to_regclass('public.persons')::text"))).scalar_one()
        count = (await s.execute(select(func.count()).select_from(Person))).scalar_one()
    return regclass, int(count)


CASES: list[tuple[str, set[str]]] = [
    # = and != on a built-in column (case-insensitive); != includes a missing value
    ("company = 'Acme'", {"Ada", "Barbara"}),
    ("company != 'Acme'", {"Grace", "Alan", "Edsger", "Ken"}),
    # numbers compare numerically with numeric custom fields (JSON numbers and numeric strings)
    ("employees > 50", {"Ada", "Grace"}),  # text order would put "9.5" above "50"
    ("employees < 100", {"Alan", "Barbara", "Ken"}),  # "1200" < "100" never; -3 < 100; n/a never
    ("employees = 250", {"Ada"}),
    ("employees = 250.0", {"Ada"}),
    ("employees >= 40 and employees <= 250", {"Ada", "Alan"}),
    ("employees > -5 and employees < 0", {"Ken"}),
    ("employees != 250", {"Grace", "Alan", "Edsger", "Barbara", "Ken"}),
    ("employees = 'n/a'", {"Edsger"}),
    # in, on text and on numbers
    ("role in ('CEO', 'cto')", {"Ada", "Grace"}),
    ("employees in (40, 1200)", {"Alan", "Grace"}),
    # contains is a case-insensitive substring; % and _ are literal
    ("city contains 'berlin'", {"Ada", "Barbara"}),
    ("notes contains '50%'", {"Edsger"}),
    ("city contains '_'", set()),
    ("city contains '%'", set()),
    # is empty / is not empty: an empty string and a missing key are both empty
    ("city is empty", {"Alan", "Edsger", "Ken"}),
    ("city is not empty", {"Ada", "Grace", "Barbara"}),
    ("company is empty", {"Edsger"}),
    # identity fields
    ("email = 'ADA@acme.test'", {"Ada"}),
    ("email contains '@acme'", {"Ada", "Barbara"}),
    ("email is empty", {"Alan", "Edsger", "Ken"}),
    ("email is not empty and x_handle is empty", {"Ada", "Barbara"}),
    ("x_user_id = '12345'", {"Alan"}),
    ("x_handle in ('@grace', '@nobody')", {"Grace"}),
    ("linkedin_url contains 'edsger'", {"Edsger"}),
    ("email != 'ada@acme.test'", EVERYONE - {"Ada"}),
    # booleans in JSONB
    ("vip = true", {"Grace"}),
    ("vip = false", {"Ada"}),
    # not / and / or: precedence and parentheses
    ("company = 'Globex' or company = 'Acme' and role = 'CEO'", {"Grace", "Ada"}),
    ("(company = 'Globex' or company = 'Acme') and role = 'CEO'", {"Ada"}),
    ("not company = 'Acme'", {"Grace", "Alan", "Edsger", "Ken"}),  # a missing company is "not Acme"
    ("not not company = 'acme'", {"Ada", "Barbara"}),
    ("NOT company = 'acme' AND employees > 50", {"Grace"}),
    ("not (company = 'acme' or city is empty)", {"Grace"}),
    ("not role in ('CEO', 'CTO')", {"Alan", "Edsger", "Barbara", "Ken"}),
    ("first_name = 'Ada' or (last_name = 'Hopper' and not vip = false)", {"Ada", "Grace"}),
    # quoted strings with escapes, in either quote style
    ("company = 'O\\'Brien & Sons'", {"Alan"}),
    ('company = "O\'Brien & Sons"', {"Alan"}),
    ('last_name = "Back\\\\slash \\"Q\\""', {"Ken"}),
    ("id > 0", EVERYONE),
]


@pytest.mark.parametrize(("expr", "expected"), CASES, ids=[c[0] for c in CASES])
async def test_rule_evaluates_in_postgres(session_factory: SessionFactory, expr: str, expected: set[str]) -> None:
    names = await _seed(session_factory)
    assert await _match(session_factory, names, expr) == expected


async def test_id_compared_as_number_and_as_text(session_factory: SessionFactory) -> None:
    names = await _seed(session_factory)
    ada = next(i for i, n in names.items() if n == "Ada")
    assert await _match(session_factory, names, f"id = {ada}") == {"Ada"}
    assert await _match(session_factory, names, f"id = '{ada}'") == {"Ada"}
    assert await _match(session_factory, names, f"id in ({ada}, {ada + 1000})") == {"Ada"}
    assert await _match(session_factory, names, "id = 'abc'") == set()
    assert await _match(session_factory, names, f"id < {ada}.5 and id > {ada - 1}.5") == {"Ada"}


ERRORS: list[tuple[str, str, int]] = [
    # (rule, words the message contains, 1-based column)
    ("company = 'Acme", "unterminated string", 11),
    ('company = "Acme\\"', "unterminated string", 11),
    ("company == 'Acme'", "unknown operator '=='", 9),
    ("company ~ 'Acme'", "unknown operator '~'", 9),
    ("company <> 'Acme'", "unknown operator '<>'", 9),
    ("company like 'Acme'", "expected an operator", 9),
    ("company = ", "expected a value", 11),
    ("company = 'a' and", "missing comparison", 18),
    ("company in ()", "expected a value", 13),
    ("company in ('a', 'b'", "expected ')' to close the list", 21),
    ("= 'Acme'", "expected a field name", 1),
    ("company is 'x'", "expected 'empty' after is", 12),
    ("company contains 5", "contains needs a quoted string", 18),
    ("company = 'a' role", "unexpected 'role'", 15),
    ("company = 'a')", "unexpected ')'", 14),
    ("(company = 'a'", "expected ')'", 15),
    ("", "empty rule", 1),
    ("   ", "empty rule", 1),
    ("email < 'a'", "not supported on identity field email", 1),
]


@pytest.mark.parametrize(("expr", "words", "column"), ERRORS, ids=[repr(e[0]) for e in ERRORS])
def test_parse_error_names_the_position(expr: str, words: str, column: int) -> None:
    with pytest.raises(RuleSyntaxError) as err:
        compile_rule(expr)
    message = str(err.value)
    assert words in message
    assert f"at column {column}\n" in message
    assert err.value.position == column - 1
    caret_line = message.splitlines()[-1]
    assert caret_line.index("^") - 2 == column - 1  # the caret sits under the column


INJECTION_ERRORS: list[tuple[str, int]] = [
    ('"; DROP TABLE persons; --', 1),
    ('company = ""; DROP TABLE persons; --"', 13),
    ("company = 'a'; DROP TABLE persons", 14),
    ("fields->>'x' = 'y'", 7),
    ("1=1", 1),
    ("company = 'x' or 1=1", 18),
    ("company = 'x' OR '1'='1'", 18),
    ("company = 'x' -- comment", 15),
    ("company = 'x' /* c */", 15),
    ("company = 'x' union select 1", 15),
    ("persons.company = 'x'", 8),
    ("company \uff1d 'x'", 9),  # fullwidth equals sign
    ("c\u03bfmpany = 'Acme'", 2),  # Greek omicron in the field name
    ("employees > \u0665\u0660", 13),  # Arabic-Indic digits are not numbers here
    ("company = 'a\x00b'", 13),  # NUL cannot reach PostgreSQL
]


@pytest.mark.parametrize(("expr", "column"), INJECTION_ERRORS, ids=[repr(e[0]) for e in INJECTION_ERRORS])
async def test_injection_attempts_are_syntax_errors(session_factory: SessionFactory, expr: str, column: int) -> None:
    await _seed(session_factory)
    before = await _table_state(session_factory)
    with pytest.raises(RuleSyntaxError) as err:
        async with session_factory() as s:
            await evaluate_rule(s, expr)
    assert err.value.position == column - 1, str(err.value)
    with pytest.raises(RuleSyntaxError):
        await create_rule_segment(session_factory, "evil", expr)
    assert await _table_state(session_factory) == before == ("persons", len(PEOPLE))
    async with session_factory() as s:
        assert (await s.execute(select(func.count()).select_from(Segment))).scalar_one() == 0


LITERALS: list[tuple[str, set[str]]] = [
    ('company = "x\' OR 1=1 --"', {"Ken"}),
    ("company = 'x\\' OR 1=1 --'", {"Ken"}),
    ('role = "\'; DROP TABLE persons; --"', {"Ken"}),
    ("role contains 'DROP TABLE'", {"Ken"}),
    ("notes contains \"first_name = 'x'\"", {"Edsger"}),
    ("company = '\"; DROP TABLE persons; --'", set()),
    ("company in (\"a') OR ('1'='1\", 'Acme')", {"Ada", "Barbara"}),
    ("company = 'Ac\u200bme'", set()),  # a zero-width space is a different string
    ("company = '\u202eemcA'", set()),  # a right-to-left override is literal too
    ("company = 'ACME' or company = 'ａｃｍｅ'", {"Ada", "Barbara"}),  # fullwidth letters match nobody
]


@pytest.mark.parametrize(("expr", "expected"), LITERALS, ids=[repr(e[0]) for e in LITERALS])
async def test_injection_attempts_match_literally(
    session_factory: SessionFactory, expr: str, expected: set[str]
) -> None:
    names = await _seed(session_factory)
    assert await _match(session_factory, names, expr) == expected
    seg = await create_rule_segment(session_factory, "literal", expr)
    assert seg.size == len(expected)
    assert await _table_state(session_factory) == ("persons", len(PEOPLE))


@pytest.mark.parametrize(
    ("expr", "literals"),
    [
        ('company = "x\' OR 1=1 --"', ["x' or 1=1 --"]),
        ("role = '; DROP TABLE persons; --'", ["; drop table persons; --", "role"]),
        ("notes contains 'UNION SELECT'", ["UNION SELECT", "notes"]),
        ("role in (\"a'b\", 'c--d')", ["a'b", "c--d", "role"]),
        ("email = \"x' OR '1'='1\"", ["x' or '1'='1"]),
        ("secret_field is empty", ["secret_field"]),
    ],
)
def test_values_and_field_names_are_bound_parameters(expr: str, literals: list[str]) -> None:
    stmt = select(Person.id).where(compile_rule(expr))
    compiled = stmt.compile(dialect=postgresql.asyncpg.dialect())
    sql = str(compiled)
    params = [str(v) for v in compiled.params.values()]
    for literal in literals:
        assert literal not in sql, sql
        assert literal.lower() not in sql.lower(), sql
        assert any(literal in p or literal in p.replace("/", "") for p in params), (literal, params)
    assert "$" in sql  # asyncpg's numbered placeholders carry the values


def test_canonical_form_ignores_spacing_quotes_and_keyword_case() -> None:
    assert canonical_rule("company='Acme' AND  employees>5") == canonical_rule('company = "Acme" and employees > 5')
    assert canonical_rule("company = 'Acme'") != canonical_rule("company = 'acme '")
    assert canonical_rule("a = 1 or b = 2 and c = 3") != canonical_rule("(a = 1 or b = 2) and c = 3")
    assert canonical_rule("not a is empty") == "not (a is empty)"
    assert canonical_rule("a is not empty") == "a is not empty"
    assert parse_rule("x in (1, 'b')").values == [1, "b"]


async def test_create_rule_segment_versions(session_factory: SessionFactory) -> None:
    await _seed(session_factory)
    first = await create_rule_segment(session_factory, "acme-leads", "company = 'Acme'")
    assert (first.version, first.size) == (1, 2)
    same = await create_rule_segment(session_factory, "acme-leads", "company = 'Acme'")
    assert (same.version, same.size) == (1, 2)
    reformatted = await create_rule_segment(session_factory, "acme-leads", 'company="Acme"')
    assert reformatted.version == 1
    changed = await create_rule_segment(session_factory, "acme-leads", "company = 'Acme' and employees > 50")
    assert (changed.version, changed.size) == (2, 1)
    back = await create_rule_segment(session_factory, "acme-leads", "company = 'Acme'")
    assert (back.version, back.size) == (3, 2)
    with pytest.raises(RuleSyntaxError):
        await create_rule_segment(session_factory, "acme-leads", "company = ")
    async with session_factory() as s:
        [row] = (await s.execute(select(Segment))).scalars().all()
    assert (row.name, row.kind, row.version, row.rule) == ("acme-leads", "rule", 3, "company = 'Acme'")


async def test_rule_segment_cannot_take_a_static_segments_name(session_factory: SessionFactory) -> None:
    async with session_factory() as s, s.begin():
        s.add(Segment(name="imported", kind="static"))
    with pytest.raises(ValueError, match="static"):
        await create_rule_segment(session_factory, "imported", "company = 'Acme'")


# ------------------------------------------------------------------ the CLI
@pytest.fixture
def cli_env(database_url: str) -> Iterator[str]:
    """starter.py's settings pointed at the test database (settings are cached per process)."""
    from settings import get_settings

    old = os.environ.get("DATABASE_URL")
    os.environ["DATABASE_URL"] = database_url
    get_settings.cache_clear()
    try:
        yield database_url
    finally:
        if old is None:
            os.environ.pop("DATABASE_URL", None)
        else:
            os.environ["DATABASE_URL"] = old
        get_settings.cache_clear()


def _segments_in(database_url: str) -> list[tuple[str, str, int, str | None]]:
    async def go() -> list[tuple[str, str, int, str | None]]:
        engine = make_engine(database_url, pool_size=1)
        try:
            sf = make_session_factory(engine)
            async with sf() as s:
                rows = (await s.execute(select(Segment).order_by(Segment.id))).scalars().all()
                return [(r.name, r.kind, r.version, r.rule) for r in rows]
        finally:
            await engine.dispose()

    return asyncio.run(go())


def _seed_sync(database_url: str) -> None:
    async def go() -> None:
        engine = make_engine(database_url, pool_size=1)
        try:
            await _seed(make_session_factory(engine))
        finally:
            await engine.dispose()

    asyncio.run(go())


def test_cli_segments_create_versions_and_reports_errors(cli_env: str) -> None:
    from starter import app

    _seed_sync(cli_env)
    runner = CliRunner()
    first = runner.invoke(app, ["segments", "create", "berlin", "--where", "city contains 'berlin'"])
    assert first.exit_code == 0, first.output
    assert "version 1: 2 people" in first.output
    again = runner.invoke(app, ["segments", "create", "berlin", "--where", "city contains 'berlin'"])
    assert again.exit_code == 0 and "version 1: 2 people" in again.output
    changed = runner.invoke(app, ["segments", "create", "berlin", "--where", "city contains 'berlin' and vip = false"])
    assert changed.exit_code == 0 and "version 2: 1 people" in changed.output
    bad = runner.invoke(app, ["segments", "create", "berlin", "--where", "city contains 'berlin"])
    assert bad.exit_code == 1 and "--where:" in bad.output, bad.output
    assert "unterminated string at column 15" in bad.output, bad.output
    assert "city contains 'berlin\n" in bad.output and "              ^" in bad.output
    assert _segments_in(cli_env) == [("berlin", "rule", 2, "city contains 'berlin' and vip = false")]
