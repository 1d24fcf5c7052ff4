"""The rule language of `segments create NAME --where EXPR`, compiled to parameterised SQL.

    company = 'Acme' and (role in ('CEO', 'CTO') or not email is empty)
    employees > 50 and city contains "berlin"

Comparisons: `=`, `!=`, `<`, `>`, `<=`, `>=`, `in (…)`, `contains`, `is empty`,
`is not empty`; combined with `and`, `or`, `not` and parentheses (`not` binds tightest,
then `and`, then `or`). Fields are person columns (first_name, last_name, company,
timezone, id), identity fields (email, x_handle, x_user_id, linkedin_url,
xmtp_address) and any other name is a custom CSV column. Strings are quoted with ' or "
and a backslash escapes the next character (`'O\\'Brien'`); text comparisons ignore case;
a number compares numerically with a custom field whose value is a number (other values
never match `<`, `>`, `=`). A person without a field matches `!=` and `is empty`.
Values only ever become bound parameters: the rule text is never pasted into SQL.
Errors name the column (1-based) and show a caret under it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Numeric, and_, case, cast, exists, false, func, not_, or_, select, true
from sqlalchemy.ext.asyncio import AsyncSession

from db.tables import Identity, Person
from models.identity_kinds import FIELD_KIND

COLUMNS = {"first_name", "last_name", "company", "timezone", "id"}
#: Rule field → identity channel (the one table: models/identity_kinds.py).
IDENTITY_FIELDS = FIELD_KIND
_NUMBER = r"^-?[0-9]+(\.[0-9]+)?$"
_TOKEN = re.compile(
    r"""\s*(?:
        (?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
      | (?P<num>-?[0-9]+(?:\.[0-9]+)?)(?![\w.])
      | (?P<op>[<>=!~]+)
      | (?P<punct>[(),])
      | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
    )""",
    re.VERBOSE,
)
KEYWORDS = {"and", "or", "not", "in", "contains", "is", "empty", "true", "false"}
OPERATORS = {"=", "!=", "<", ">", "<=", ">="}


class RuleSyntaxError(ValueError):
    """A rule that does not parse; says where, with a caret under the expression."""

    def __init__(self, message: str, position: int, expr: str) -> None:
        self.position = position
        self.expr = expr
        super().__init__(f"{message} at column {position + 1}\n  {expr}\n  {' ' * position}^")


@dataclass
class Tok:
    kind: str
    value: str
    pos: int


def tokenize(expr: str) -> list[Tok]:
    """Split a rule into tokens (RuleSyntaxError on anything unknown)."""
    toks: list[Tok] = []
    pos = 0
    while pos < len(expr):
        if expr[pos:].strip() == "":
            break
        m = _TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            start = pos + (len(expr[pos:]) - len(expr[pos:].lstrip()))
            ch = expr[start]
            if ch in "'\"":
                raise RuleSyntaxError("unterminated string", start, expr)
            raise RuleSyntaxError(f"unexpected character {ch!r}", start, expr)
        kind = m.lastgroup or ""
        start = m.start(kind)
        value = m.group(kind)
        if kind == "str":
            if "\x00" in value:
                raise RuleSyntaxError("a NUL character cannot be part of a string", start + value.index("\x00"), expr)
            value = re.sub(r"\\(.)", r"\1", value[1:-1], flags=re.DOTALL)
        elif kind == "op" and value not in OPERATORS:
            raise RuleSyntaxError(f"unknown operator {value!r} (use =, !=, <, >, <=, >=)", start, expr)
        elif kind == "word" and value.lower() in KEYWORDS:
            kind, value = "kw", value.lower()
        toks.append(Tok(kind, value, start))
        pos = m.end()
    toks.append(Tok("end", "", len(expr)))
    return toks


@dataclass
class Cmp:
    """field OP value(s)."""

    field: str
    op: str
    values: list[Any]
    pos: int


@dataclass
class BoolOp:
    """and / or over parts."""

    op: str
    parts: list[Any]


@dataclass
class Not:
    """not part."""

    part: Any


class _Parser:
    def __init__(self, expr: str) -> None:
        self.expr = expr
        self.toks = tokenize(expr)
        self.i = 0

    def peek(self) -> Tok:
        return self.toks[self.i]

    def take(self) -> Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def fail(self, message: str, tok: Tok | None = None) -> RuleSyntaxError:
        tok = tok or self.peek()
        return RuleSyntaxError(message, tok.pos, self.expr)

    def parse(self) -> Any:
        if self.peek().kind == "end":
            raise RuleSyntaxError("empty rule", 0, self.expr)
        node = self.or_()
        if self.peek().kind != "end":
            raise self.fail(f"unexpected {self.peek().value!r}")
        return node

    def or_(self) -> Any:
        parts = [self.and_()]
        while self.peek().kind == "kw" and self.peek().value == "or":
            self.take()
            parts.append(self.and_())
        return parts[0] if len(parts) == 1 else BoolOp("or", parts)

    def and_(self) -> Any:
        parts = [self.not_()]
        while self.peek().kind == "kw" and self.peek().value == "and":
            self.take()
            parts.append(self.not_())
        return parts[0] if len(parts) == 1 else BoolOp("and", parts)

    def not_(self) -> Any:
        if self.peek().kind == "kw" and self.peek().value == "not":
            self.take()
            return Not(self.not_())
        return self.atom()

    def atom(self) -> Any:
        tok = self.peek()
        if tok.kind == "punct" and tok.value == "(":
            self.take()
            node = self.or_()
            if not (self.peek().kind == "punct" and self.peek().value == ")"):
                raise self.fail("expected ')'")
            self.take()
            return node
        if tok.kind != "word":
            raise self.fail("expected a field name" if tok.kind != "end" else "missing comparison")
        self.take()
        op = self.peek()
        if op.kind == "op":
            self.take()
            return Cmp(tok.value, op.value, [self.value()], tok.pos)
        if op.kind == "kw" and op.value == "contains":
            self.take()
            val = self.value()
            if not isinstance(val, str):
                raise self.fail("contains needs a quoted string", self.toks[self.i - 1])
            return Cmp(tok.value, "contains", [val], tok.pos)
        if op.kind == "kw" and op.value == "in":
            self.take()
            if not (self.peek().kind == "punct" and self.peek().value == "("):
                raise self.fail("expected '(' after in")
            self.take()
            values = [self.value()]
            while self.peek().kind == "punct" and self.peek().value == ",":
                self.take()
                values.append(self.value())
            if not (self.peek().kind == "punct" and self.peek().value == ")"):
                raise self.fail("expected ')' to close the list")
            self.take()
            return Cmp(tok.value, "in", values, tok.pos)
        if op.kind == "kw" and op.value == "is":
            self.take()
            negate = False
            if self.peek().kind == "kw" and self.peek().value == "not":
                self.take()
                negate = True
            if not (self.peek().kind == "kw" and self.peek().value == "empty"):
                raise self.fail("expected 'empty' after is")
            self.take()
            return Cmp(tok.value, "is not empty" if negate else "is empty", [], tok.pos)
        raise self.fail("expected an operator (=, !=, <, >, <=, >=, in, contains, is empty)", op)

    def value(self) -> Any:
        tok = self.take()
        if tok.kind == "str":
            return tok.value
        if tok.kind == "num":
            return float(tok.value) if "." in tok.value else int(tok.value)
        if tok.kind == "kw" and tok.value in ("true", "false"):
            return tok.value == "true"
        raise self.fail("expected a value (a quoted string, a number, true or false)", tok)


def parse_rule(expr: str) -> Any:
    """The rule's syntax tree (RuleSyntaxError names the position)."""
    return _Parser(expr).parse()


def _text_value(field: str) -> ColumnElement[Any]:
    if field in COLUMNS:
        col = getattr(Person, field)
        return cast(col, Person.company.type) if field == "id" else col
    return Person.fields[field].astext


def _compile_cmp(node: Cmp) -> ColumnElement[bool]:
    field, op, values = node.field, node.op, node.values
    if field in IDENTITY_FIELDS:
        channel = IDENTITY_FIELDS[field]
        ident = select(Identity.id).where(Identity.person_id == Person.id, Identity.channel == channel)
        if op == "is empty":
            return not_(exists(ident))
        if op == "is not empty":
            return exists(ident)
        if op == "=":
            return exists(ident.where(func.lower(Identity.value) == str(values[0]).lower()))
        if op == "!=":
            return not_(exists(ident.where(func.lower(Identity.value) == str(values[0]).lower())))
        if op == "contains":
            return exists(ident.where(Identity.value.icontains(str(values[0]), autoescape=True)))
        if op == "in":
            return exists(ident.where(func.lower(Identity.value).in_([str(v).lower() for v in values])))
        raise ValueError(f"{field}: operator {op} is not supported on identity fields")  # _check reports it first
    value = _text_value(field)
    if op == "is empty":
        return or_(value.is_(None), func.trim(value) == "")
    if op == "is not empty":
        return and_(value.is_not(None), func.trim(value) != "")
    if op == "contains":
        return value.icontains(str(values[0]), autoescape=True)
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    if field == "id" and numeric:
        col: Any = Person.id if all(isinstance(v, int) for v in values) else cast(Person.id, Numeric)
        vals: list[Any] = list(values)
    elif numeric:
        col = case((value.op("~")(_NUMBER), cast(value, Numeric)), else_=None)
        vals = list(values)
    else:
        col = func.lower(value)
        vals = [str(v).lower() if not isinstance(v, bool) else str(v).lower() for v in values]
    if op == "in":
        return col.in_(vals)
    v = vals[0]
    if op == "=":
        return col == v
    if op == "!=":
        return or_(col.is_(None), col != v)
    if op == "<":
        return col < v
    if op == ">":
        return col > v
    if op == "<=":
        return col <= v
    return col >= v


def _compile(node: Any) -> ColumnElement[bool]:
    if isinstance(node, Cmp):
        return _compile_cmp(node)
    if isinstance(node, Not):
        # two-valued: a comparison on a missing field is false, so its negation is true
        return not_(func.coalesce(_compile(node.part), false()))
    parts = [_compile(p) for p in node.parts]
    return and_(true(), *parts) if node.op == "and" else or_(false(), *parts)


_IDENTITY_OPS = {"=", "!=", "in", "contains", "is empty", "is not empty"}


def _check(node: Any, expr: str) -> None:
    """Reject what parses but cannot be evaluated, still naming the position."""
    if isinstance(node, Cmp):
        if node.field in IDENTITY_FIELDS and node.op not in _IDENTITY_OPS:
            message = f"operator {node.op!r} is not supported on identity field {node.field}"
            raise RuleSyntaxError(message, node.pos, expr)
    elif isinstance(node, Not):
        _check(node.part, expr)
    else:
        for part in node.parts:
            _check(part, expr)


def canonical(node: Any) -> str:
    """A normal form of a parsed rule: equal for rules that differ only in spacing, quotes or case of keywords."""
    if isinstance(node, Cmp):
        values = ", ".join(json.dumps(v) for v in node.values)
        return f"{node.field} {node.op}" + (f" ({values})" if node.op == "in" else f" {values}" if values else "")
    if isinstance(node, Not):
        return f"not ({canonical(node.part)})"
    return f" {node.op} ".join(f"({canonical(p)})" for p in node.parts)


def canonical_rule(expr: str) -> str:
    """`canonical` of the rule's text (RuleSyntaxError if it does not parse)."""
    return canonical(parse_rule(expr))


def compile_rule(expr: str) -> ColumnElement[bool]:
    """A SQLAlchemy condition over `Person` for the rule (only bound parameters)."""
    node = parse_rule(expr)
    _check(node, expr)
    return _compile(node)


async def evaluate_rule(session: AsyncSession, expr: str) -> list[int]:
    """The ids of the people matching the rule, ordered."""
    rows = await session.execute(select(Person.id).where(compile_rule(expr)).order_by(Person.id))
    return list(rows.scalars())
