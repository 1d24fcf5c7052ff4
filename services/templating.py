"""Templates: sandboxed Jinja2 with StrictUndefined, checked before anything is sent.

A message with a hole in it ("Hi ,") is worse than no message. Templates are rendered
in Jinja2's sandbox with `StrictUndefined`, so a variable that does not exist is an
error naming it, and they are checked three times: for syntax when a version is
created, against every person of the audience when it is enrolled (or dry-run), and
at send time (a failure there is a permanent delivery failure, never a half-send).
Variables are the person's known fields plus every custom CSV column.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from jinja2 import StrictUndefined, Template, TemplateSyntaxError, UndefinedError, meta
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import SandboxedEnvironment
from sqlalchemy import select

from db.session import SessionFactory
from db.tables import Identity, Person
from models.identity_kinds import KIND_FIELD
from models.sequence import MESSAGE_ACTIONS, SequenceDefinition, Step, Variant

KNOWN_FIELDS = (
    "first_name",
    "last_name",
    "company",
    "timezone",
    "email",
    "x_handle",
    "x_user_id",
    "linkedin_url",
    "xmtp_address",
)
#: Identity channel → template variable (the one table: models/identity_kinds.py).
IDENTITY_FIELD: Mapping[str, str] = KIND_FIELD
_UNDEFINED = re.compile(r"^'([^']+)' is undefined$")
#: Largest string or list a template may build with `*`, and largest exponent of `**`.
MAX_REPEAT = 100_000
MAX_EXPONENT = 100


class _Sandbox(SandboxedEnvironment):
    """Jinja's sandbox, also refusing `"x" * 10**9` and `10 ** 100000000` (memory and CPU bombs)."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int | float) and abs(right) > MAX_EXPONENT:
            raise SecurityError(f"exponent {right} is larger than {MAX_EXPONENT}")
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(times, int) and len(seq) * times > MAX_REPEAT:
                    raise SecurityError(f"repetition would build {len(seq) * times} items (limit {MAX_REPEAT})")
        return super().call_binop(context, operator, left, right)


_TEXT = _Sandbox(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
_HTML = _Sandbox(undefined=StrictUndefined, autoescape=True, keep_trailing_newline=True)
FIELDS = ("subject", "text", "body", "html")


class TemplateError(ValueError):
    """A template that cannot render for this person."""


@dataclass
class TemplateProblem:
    """One problem: where (step, variant, field), for whom, and what."""

    step: str
    variant: str | None
    field: str
    message: str
    person_id: int | None = None

    def __str__(self) -> str:
        where = f"step {self.step!r}" + (f" variant {self.variant!r}" if self.variant else "")
        who = f"person {self.person_id}, " if self.person_id is not None else ""
        return f"{who}{where} {self.field}: {self.message}"


@dataclass
class RenderedContent:
    """A rendered message."""

    subject: str | None
    text: str | None
    html: str | None
    variant: str | None


def person_context(person: Person, identities: Iterable[Identity]) -> dict[str, Any]:
    """Template variables: custom fields, then known fields (known ones win).

    Only fields with a value are variables: a person without a first name makes
    `{{ first_name }}` an error (never "Hi ,"); a template that accepts a missing
    value says so with `{{ first_name | default('there') }}` or `{% if x_handle is defined %}`.
    """
    ctx: dict[str, Any] = {k: v for k, v in (person.fields or {}).items() if v not in (None, "")}
    known = {
        "first_name": person.first_name,
        "last_name": person.last_name,
        "company": person.company,
        "timezone": person.timezone or "UTC",
    }
    ctx.update({k: v for k, v in known.items() if v not in (None, "")})
    for ident in identities:
        name = IDENTITY_FIELD.get(ident.channel)
        if name and ident.value:
            ctx[name] = ident.value
    return ctx


def _sources(step: Step) -> list[tuple[str | None, Step | Variant]]:
    if step.variants:
        return [(v.name, v) for v in step.variants]
    return [(None, step)]


@functools.lru_cache(maxsize=1024)
def _compiled(env: SandboxedEnvironment, source: str) -> Template:
    """Compile once per source: a sequence's few templates render for every person."""
    return env.from_string(source)


def _render(env: SandboxedEnvironment, source: str, ctx: dict[str, Any], where: str) -> str:
    try:
        return _compiled(env, source).render(ctx)
    except SecurityError as err:
        raise TemplateError(f"{where}: not allowed in templates: {err}") from None
    except UndefinedError as err:
        known = ", ".join(sorted(ctx)) or "none"
        text = str(err.message or err)
        match = _UNDEFINED.match(text)
        if match:
            name = match.group(1)
            raise TemplateError(
                f"{where}: template variable {name!r} is not set for this person (known: {known}; "
                f"for an optional value write {{{{ {name} | default('') }}}})"
            ) from None
        raise TemplateError(f"{where}: {text}") from None
    except TemplateSyntaxError as err:
        raise TemplateError(f"{where}: syntax error on line {err.lineno}: {err.message}") from None
    except OverflowError as err:  # the sandbox's range limit
        raise TemplateError(f"{where}: not allowed in templates: {err}") from None
    except Exception as err:  # 1/0, "a" + 1 …: a template that cannot render is a TemplateError
        raise TemplateError(f"{where}: {type(err).__name__}: {err}") from None


def render_step(step: Step, variant_name: str | None, context: dict[str, Any]) -> RenderedContent:
    """Render a step's content (the chosen variant's, if it has variants)."""
    source: Step | Variant = step
    if step.variants:
        source = next((v for v in step.variants if v.name == variant_name), step.variants[0])
    where = f"step {step.id!r}" + (f" variant {source.name!r}" if isinstance(source, Variant) else "")
    subject = _render(_TEXT, source.subject, context, where + " subject") if source.subject else None
    text_src = source.text or source.body
    text = _render(_TEXT, text_src, context, where + " text") if text_src else None
    html = _render(_HTML, source.html, context, where + " html") if source.html else None
    if subject is not None:
        subject = " ".join(subject.split())
    return RenderedContent(
        subject=subject,
        text=text,
        html=html,
        variant=source.name if isinstance(source, Variant) else None,
    )


def check_definition_templates(defn: SequenceDefinition, known_fields: set[str] | None = None) -> list[TemplateProblem]:
    """Syntax of every template, and (when `known_fields` is given) every variable.

    At `sequences create` time custom CSV columns are not known yet, so callers pass
    None: syntax and sandbox rules are checked then, variables at enroll time against
    each person.
    """
    problems: list[TemplateProblem] = []
    for step in defn.steps:
        for variant, src in _sources(step):
            for field in FIELDS:
                source = getattr(src, field, None)
                if not source:
                    continue
                env = _HTML if field == "html" else _TEXT
                try:
                    ast = env.parse(source)
                    env.from_string(source)  # compiling finds unknown filters and tests too
                except TemplateSyntaxError as err:
                    problems.append(
                        TemplateProblem(
                            step.id,
                            variant,
                            field,
                            f"syntax error on line {err.lineno}: {err.message}",
                        )
                    )
                    continue
                if known_fields is not None:
                    for name in sorted(meta.find_undeclared_variables(ast) - known_fields):
                        problems.append(
                            TemplateProblem(
                                step.id,
                                variant,
                                field,
                                f"template variable {name!r} does not exist",
                            )
                        )
    return problems


def message_steps(defn: SequenceDefinition) -> list[Step]:
    """Every step that sends a message (rendered for every person at enroll)."""
    return [s for s in defn.steps if s.action in MESSAGE_ACTIONS]


async def check_audience(
    session_factory: SessionFactory, defn: SequenceDefinition, person_ids: list[int]
) -> list[TemplateProblem]:
    """Render every message step (every variant) for every person; list what fails."""
    steps = message_steps(defn)
    problems: list[TemplateProblem] = []
    if not steps or not person_ids:
        return problems
    for i in range(0, len(person_ids), 1000):
        chunk = person_ids[i : i + 1000]
        async with session_factory() as session:
            people = list((await session.execute(select(Person).where(Person.id.in_(chunk)))).scalars())
            idents = list((await session.execute(select(Identity).where(Identity.person_id.in_(chunk)))).scalars())
        by_person: dict[int, list[Identity]] = {}
        for ident in idents:
            by_person.setdefault(ident.person_id, []).append(ident)
        for person in people:
            ctx = person_context(person, by_person.get(person.id, []))
            for step in steps:
                for variant, _ in _sources(step):
                    try:
                        render_step(step, variant, ctx)
                    except TemplateError as err:
                        problems.append(TemplateProblem(step.id, variant, "template", str(err), person.id))
    return problems
