"""Templates: sandboxed Jinja2 with StrictUndefined, custom CSV fields, A/B variants."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from db.session import SessionFactory
from db.tables import Identity, Person
from models.schedule import choose_variant
from models.sequence import SequenceDefinition, Step, Variant
from models.sequence_checks import validate_definition
from services.people_import import import_people
from services.templating import (
    TemplateError,
    check_audience,
    check_definition_templates,
    person_context,
    render_step,
)
from tests.engine_harness import make_person

END = [{"trigger": "END"}]


def email_step(subject: str, body: str = "Hello", *, html: str | None = None, step_id: str = "intro") -> Step:
    doc: dict[str, Any] = {"id": step_id, "action": "SEND_EMAIL", "subject": subject, "body": body, "edges": END}
    if html is not None:
        doc["html"] = html
    return validate_definition({"name": "t", "steps": [doc]}).steps[0]


def ab_sequence(weight_a: float = 1, weight_b: float = 1) -> SequenceDefinition:
    return validate_definition(
        {
            "name": "ab",
            "steps": [
                {
                    "id": "intro",
                    "action": "SEND_EMAIL",
                    "variants": [
                        {"name": "A", "weight": weight_a, "subject": "Quick question, {{ first_name }}", "body": "A"},
                        {"name": "B", "weight": weight_b, "subject": "{{ company }} + {{ role }}", "body": "B"},
                    ],
                    "edges": [
                        {"trigger": "REPLIED", "to": "done"},
                        {"trigger": "NOT_REPLIED", "after": "3d", "to": "dm"},
                    ],
                },
                {"id": "dm", "action": "SEND_TWITTER_DM", "text": "Hi {{ first_name }} from {{ city }}", "edges": END},
                {"id": "done", "action": "WAIT", "edges": END},
            ],
        }
    )


def test_unknown_variable_is_an_error_naming_variable_and_step() -> None:
    step = email_step("Hi {{ first_name }}", "As {{ role }} at {{ company }} ...", step_id="opener")
    with pytest.raises(TemplateError) as info:
        render_step(step, None, {"first_name": "Ada", "company": "Acme"})
    text = str(info.value)
    assert "'role'" in text and "step 'opener'" in text and "text" in text
    assert "company, first_name" in text  # what is known, to help fix a typo


def test_a_missing_known_field_is_an_error_not_a_hole() -> None:
    step = email_step("Hi {{ first_name }},")
    person = Person(first_name=None, last_name="Lovelace", company="", timezone="UTC", fields={})
    with pytest.raises(TemplateError, match="'first_name' is not set for this person"):
        render_step(step, None, person_context(person, []))
    # a template that accepts a missing value says so
    polite = email_step("Hi {{ first_name | default('there') }},")
    assert render_step(polite, None, person_context(person, [])).subject == "Hi there,"
    optional = email_step("{% if company is defined %}{{ company }}{% else %}your team{% endif %}")
    assert render_step(optional, None, person_context(person, [])).subject == "your team"


@pytest.mark.parametrize(
    "payload",
    [
        "{{ ''.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ first_name.__class__.__init__.__globals__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ ''.format.__self__ }}",
        "{% set x = namespace() %}{{ x.__class__ }}",
    ],
)
def test_sandbox_blocks_attribute_access(payload: str) -> None:
    step = email_step("subject", payload, step_id="evil")
    with pytest.raises(TemplateError) as info:
        render_step(step, None, {"first_name": "Ada"})
    text = str(info.value)
    assert "step 'evil'" in text
    assert "not allowed" in text or "unsafe" in text or "has no attribute" in text, text
    assert "<class" not in text and "subclasses" not in text.split(":")[0]


@pytest.mark.parametrize(
    "bomb",
    ["{% for i in range(10**9) %}x{% endfor %}", "{{ 'x' * 10**9 }}", "{{ [1] * 10**8 }}", "{{ 10 ** 100000000 }}"],
)
def test_sandbox_blocks_memory_and_cpu_bombs(bomb: str) -> None:
    step = email_step("s", bomb)
    with pytest.raises(TemplateError, match="step 'intro' text: not allowed in templates"):
        render_step(step, None, {})
    assert render_step(email_step("s", "{{ '-' * 10 }}{{ 2 ** 10 }}"), None, {}).text == "----------1024"


@pytest.mark.parametrize(
    ("source", "kind"), [("{{ 1 / 0 }}", "ZeroDivisionError"), ("{{ first_name + 1 }}", "TypeError")]
)
def test_any_render_failure_is_a_template_error(source: str, kind: str) -> None:
    with pytest.raises(TemplateError, match=f"step 'intro' text: {kind}"):
        render_step(email_step("s", source), None, {"first_name": "Ada"})


def test_html_is_escaped_and_text_is_not() -> None:
    step = email_step("About {{ company }}", "Text {{ company }}", html="<p>{{ company }}</p>")
    out = render_step(step, None, {"company": "<b>Acme & Co</b>"})
    assert out.html == "<p>&lt;b&gt;Acme &amp; Co&lt;/b&gt;</p>"
    assert out.text == "Text <b>Acme & Co</b>"
    assert out.subject == "About <b>Acme & Co</b>"


def test_subject_is_one_line() -> None:
    step = email_step("Hi\n{{ first_name }}\r\nBcc: everyone@example.com")
    out = render_step(step, None, {"first_name": "Ada"})
    assert out.subject == "Hi Ada Bcc: everyone@example.com"
    assert out.subject is not None and "\n" not in out.subject and "\r" not in out.subject


async def test_custom_csv_fields_are_template_variables(session_factory: SessionFactory, tmp_path: Path) -> None:
    path = tmp_path / "people.csv"
    path.write_text(
        "email,first_name,company,x_handle,role,city,favourite_language\n"
        "ada@analytical.example,Ada,Analytical,@Ada_L,CTO,London,Note G\n"
    )
    report = await import_people(session_factory, path, "s")
    assert report.errors == []
    async with session_factory() as s:
        person = (await s.execute(select(Person))).scalar_one()
        identities = list((await s.execute(select(Identity))).scalars())
    ctx = person_context(person, identities)
    step = email_step(
        "{{ role }} in {{ city }}",
        "Hi {{ first_name }} (@{{ x_handle }}, {{ email }}), still writing {{ favourite_language }}?",
    )
    out = render_step(step, None, ctx)
    assert out.subject == "CTO in London"
    assert out.text == "Hi Ada (@ada_l, ada@analytical.example), still writing Note G?"


def test_known_fields_win_over_custom_fields_of_the_same_name() -> None:
    person = Person(first_name="Ada", company="Real Co", timezone="UTC", fields={"company": "Spoofed", "team": "R&D"})
    ctx = person_context(person, [])
    assert ctx["company"] == "Real Co" and ctx["team"] == "R&D"


def test_variant_choice_is_deterministic_and_follows_weights() -> None:
    variants = ab_sequence(3, 1).step("intro").variants
    ids = range(1, 1001)
    first = [choose_variant(variants, key=f"{pid}:intro") for pid in ids]
    again = [choose_variant(variants, key=f"{pid}:intro") for pid in ids]
    assert [v.name for v in first if v] == [v.name for v in again if v]
    counts = Counter(v.name for v in first if v)
    # deterministic: the exact split of these 1,000 ids never changes between runs
    assert counts == Counter({"A": 743, "B": 257})
    assert 0.70 < counts["A"] / 1000 < 0.80  # and it is the 3:1 weighting
    even = Counter(
        v.name for pid in ids if (v := choose_variant(ab_sequence().step("intro").variants, key=f"{pid}:intro"))
    )
    assert even == Counter({"A": 486, "B": 514})
    # the variant depends on the person, not on the order in which people are seen
    assert choose_variant(variants, key="7:intro") == first[6]
    assert choose_variant([], key="1:intro") is None


def test_a_single_variant_or_tiny_weight() -> None:
    only = [Variant(name="solo", subject="s", body="b")]
    assert {choose_variant(only, key=f"{i}:x").name for i in range(50)} == {"solo"}  # type: ignore[union-attr]
    skewed = [
        Variant(name="A", weight=1000, subject="s", body="b"),
        Variant(name="B", weight=0.001, subject="s", body="b"),
    ]
    assert {choose_variant(skewed, key=f"{i}:x").name for i in range(200)} == {"A"}  # type: ignore[union-attr]


def test_render_uses_the_chosen_variant() -> None:
    step = ab_sequence().step("intro")
    ctx = {"first_name": "Ada", "company": "Acme", "role": "CTO"}
    assert render_step(step, "A", ctx).subject == "Quick question, Ada"
    b = render_step(step, "B", ctx)
    assert (b.subject, b.text, b.variant) == ("Acme + CTO", "B", "B")


def test_definition_check_with_known_fields() -> None:
    defn = ab_sequence()
    problems = check_definition_templates(defn, known_fields={"first_name", "company"})
    assert sorted((p.step, p.variant, p.field) for p in problems) == [("dm", None, "text"), ("intro", "B", "subject")]
    assert any("'role'" in p.message for p in problems) and any("'city'" in p.message for p in problems)
    assert check_definition_templates(defn) == []  # syntax only when fields are not known yet


async def test_check_audience_reports_people_whose_templates_do_not_render(session_factory: SessionFactory) -> None:
    sf = session_factory
    complete = await make_person(sf, email="a@x.example", x="1", fields={"role": "CTO", "city": "Paris"})
    no_role = await make_person(sf, email="b@x.example", x="2", fields={"city": "Oslo"})
    no_name = await make_person(sf, email="c@x.example", x="3", first_name="", fields={"role": "CEO", "city": "Rome"})
    problems = await check_audience(sf, ab_sequence(), [complete, no_role, no_name])
    got = sorted((p.person_id, p.step, p.variant) for p in problems)
    # every variant is checked for every person, whichever variant they would get
    assert got == sorted([(no_role, "intro", "B"), (no_name, "intro", "A"), (no_name, "dm", None)])
    by_person = {p.person_id: str(p) for p in problems if p.step == "intro"}
    assert "'role'" in by_person[no_role] and f"person {no_role}" in by_person[no_role]
    assert "'first_name'" in by_person[no_name] and "step 'intro'" in by_person[no_name]
    assert await check_audience(sf, ab_sequence(), [complete]) == []
