"""Sequence files: one test per validation rule, and immutable content-addressed versions.

Every rule is checked through `services.sequence_store.validate_file` on a real file,
as `starter.py sequences validate` does, and every error must name the step (when the
rule is about a step) and the rule.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select

from db.session import SessionFactory
from db.tables import Sequence, SequenceVersion
from models.durations import parse_duration
from models.sequence_checks import SequenceIssue, SequenceValidationError, validate_definition
from services.sequence_store import create_version, get_version, validate_file

ROOT = Path(__file__).resolve().parent.parent
END = [{"trigger": "END"}]


def seq(*steps: dict[str, Any], **top: Any) -> dict[str, Any]:
    """A sequence document named `t` with these steps."""
    return {"name": "t", **top, "steps": list(steps)}


def email(step_id: str, edges: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"id": step_id, "action": "SEND_EMAIL", "subject": "Hi", "body": "Hello", "edges": edges, **extra}


def done(step_id: str = "done") -> dict[str, Any]:
    return {"id": step_id, "action": "WAIT", "edges": END}


def write(tmp_path: Path, doc: dict[str, Any] | str, name: str = "seq.yaml") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return path


def issues_of(tmp_path: Path, doc: dict[str, Any] | str, name: str = "seq.yaml") -> list[SequenceIssue]:
    with pytest.raises(SequenceValidationError) as info:
        validate_file(write(tmp_path, doc, name))
    return info.value.issues


def find(issues: list[SequenceIssue], rule: str, step: str | None) -> SequenceIssue:
    """The issue with this rule on this step; its text names both."""
    matching = [i for i in issues if i.rule == rule and i.step == step]
    assert matching, f"no {rule!r} issue on step {step!r} in {[str(i) for i in issues]}"
    text = str(matching[0])
    assert f"[{rule}]" in text
    if step is not None:
        assert f"step {step!r}" in text
    return matching[0]


# ---------------------------------------------------------------------- one test per rule
def test_unknown_action(tmp_path: Path) -> None:
    issue = find(issues_of(tmp_path, seq({"id": "fax", "action": "SEND_FAX", "edges": END})), "unknown-action", "fax")
    assert "SEND_FAX" in issue.message


def test_unknown_trigger(tmp_path: Path) -> None:
    doc = seq(email("mail", [{"trigger": "OPENED", "to": "done"}]), done())
    issue = find(issues_of(tmp_path, doc), "unknown-trigger", "mail")
    assert "OPENED" in issue.message


def test_duplicate_step_id(tmp_path: Path) -> None:
    doc = seq(email("mail", [{"trigger": "NORMAL_EDGE", "after": "1d", "to": "done"}]), done(), done())
    issues = issues_of(tmp_path, doc)
    find(issues, "duplicate-step", "done")
    assert [i.rule for i in issues] == ["duplicate-step"]


def test_edge_to_a_missing_step(tmp_path: Path) -> None:
    doc = seq(
        email(
            "mail", [{"trigger": "REPLIED", "to": "thanks"}, {"trigger": "NOT_REPLIED", "after": "2d", "to": "done"}]
        ),
        done(),
    )
    issue = find(issues_of(tmp_path, doc), "edge-target", "mail")
    assert "'thanks'" in issue.message and "REPLIED" in issue.message


def test_step_unreachable_from_the_first(tmp_path: Path) -> None:
    doc = seq(email("mail", END), email("orphan", END))
    issue = find(issues_of(tmp_path, doc), "unreachable", "orphan")
    assert "'mail'" in issue.message  # names the first step


def test_a_path_that_never_ends(tmp_path: Path) -> None:
    # a reminder loop with waits but no way out: every path goes on forever
    doc = seq(
        email("mail", [{"trigger": "NORMAL_EDGE", "after": "2d", "to": "nudge"}]),
        email("nudge", [{"trigger": "NORMAL_EDGE", "after": "2d", "to": "mail"}]),
    )
    issues = issues_of(tmp_path, doc)
    find(issues, "never-ends", "mail")
    find(issues, "never-ends", "nudge")
    assert not [i for i in issues if i.rule == "cycle-without-wait"], "this loop waits 2d per turn"


@pytest.mark.parametrize("after", [None, "0s"])
def test_not_trigger_without_after(tmp_path: Path, after: str | None) -> None:
    edge: dict[str, Any] = {"trigger": "NOT_REPLIED", "to": "done"}
    if after is not None:
        edge["after"] = after
    doc = seq(email("mail", [{"trigger": "REPLIED", "to": "done"}, edge]), done())
    issue = find(issues_of(tmp_path, doc), "negative-needs-after", "mail")
    assert "NOT_REPLIED" in issue.message and "after" in issue.message


def test_followed_back_cannot_follow_send_email(tmp_path: Path) -> None:
    doc = seq(
        email(
            "mail",
            [{"trigger": "FOLLOWED_BACK", "to": "done"}, {"trigger": "NOT_FOLLOWED_BACK", "after": "1d", "to": "done"}],
        ),
        done(),
    )
    issues = issues_of(tmp_path, doc)
    assert "FOLLOWED_BACK" in find(issues, "trigger-fits-action", "mail").message
    assert {i.message for i in issues if i.rule == "trigger-fits-action"} == {
        "trigger FOLLOWED_BACK cannot follow action SEND_EMAIL",
        "trigger NOT_FOLLOWED_BACK cannot follow action SEND_EMAIL",
    }


@pytest.mark.parametrize("trigger", ["CONNECTION_ACCEPTED", "CONNECTION_NOT_ACCEPTED", "REPLIED_TO_NOTE"])
@pytest.mark.parametrize("action", ["SEND_LINKEDIN_DM", "SEND_EMAIL", "FOLLOW_ON_TWITTER", "CHECK_FOR_REPLY"])
def test_connection_triggers_only_after_a_connection_request(tmp_path: Path, trigger: str, action: str) -> None:
    edge: dict[str, Any] = {"trigger": trigger, "to": "done"}
    if trigger == "CONNECTION_NOT_ACCEPTED":
        edge["after"] = "3d"
    edges: list[dict[str, Any]] = [edge]
    first: dict[str, Any] = {"id": "first", "action": action, "subject": "s", "body": "b", "text": "t", "edges": edges}
    if action != "SEND_EMAIL":
        first.pop("subject")
        first.pop("body")
    if action in ("FOLLOW_ON_TWITTER", "CHECK_FOR_REPLY"):
        first.pop("text")
    if trigger != "CONNECTION_NOT_ACCEPTED":
        edges.append({"trigger": "CONNECTION_NOT_ACCEPTED", "after": "3d", "to": "done"})
    issues = issues_of(tmp_path, seq(first, done()))
    issue = find(issues, "trigger-fits-action", "first")
    assert {f"trigger {trigger} cannot follow action {action}"} <= {i.message for i in issues}
    assert action in issue.message
    # the same edges after a connection request are fine
    first.update(action="SEND_CONNECTION_REQUEST", text="Hi {{ first_name }}")
    first.pop("subject", None)
    first.pop("body", None)
    assert validate_file(write(tmp_path, seq(first, done()), "ok.yaml")).steps[0].action == "SEND_CONNECTION_REQUEST"


def test_cycle_with_no_wait(tmp_path: Path) -> None:
    doc = seq(
        email("ask", [{"trigger": "REPLIED", "to": "done"}, {"trigger": "NOT_REPLIED", "after": "1d", "to": "dm"}]),
        {"id": "dm", "action": "SEND_TWITTER_DM", "text": "ping", "edges": [{"trigger": "NORMAL_EDGE", "to": "ping"}]},
        {"id": "ping", "action": "SEND_XMTP_DM", "text": "ping", "edges": [{"trigger": "NORMAL_EDGE", "to": "dm"}]},
        done(),
    )
    issues = issues_of(tmp_path, doc)
    cycle = [i for i in issues if i.rule == "cycle-without-wait"]
    assert len(cycle) == 1, [str(i) for i in issues]
    assert cycle[0].step in ("dm", "ping")
    assert "dm -> ping -> dm" in cycle[0].message or "ping -> dm -> ping" in cycle[0].message
    # the same loop with a delay on one of its steps is a legal (if endless) loop
    doc["steps"][2]["delay"] = "1d"
    assert not [i for i in issues_of(tmp_path, doc) if i.rule == "cycle-without-wait"]


def test_a_loop_whose_only_wait_is_an_absolute_time_has_no_wait(tmp_path: Path) -> None:
    doc = seq(
        email("mail", [{"trigger": "NORMAL_EDGE", "at": "2030-01-01T09:00:00Z", "to": "again"}]),
        email("again", [{"trigger": "NORMAL_EDGE", "to": "mail"}]),
    )
    find(issues_of(tmp_path, doc), "cycle-without-wait", "mail")


@pytest.mark.parametrize(
    ("step", "missing"),
    [
        ({"id": "s", "action": "SEND_EMAIL", "body": "no subject"}, "subject"),
        ({"id": "s", "action": "SEND_EMAIL", "subject": "no body"}, "body"),
        ({"id": "s", "action": "SEND_EMAIL", "subject": "  ", "body": "blank subject"}, "subject"),
        ({"id": "s", "action": "SEND_TWITTER_DM"}, "text"),
        ({"id": "s", "action": "SEND_LINKEDIN_DM", "text": ""}, "text"),
        ({"id": "s", "action": "SEND_XMTP_DM"}, "text"),
        ({"id": "s", "action": "SEND_EMAIL", "variants": [{"name": "A", "subject": "x"}]}, "body"),
    ],
)
def test_send_action_without_content(tmp_path: Path, step: dict[str, Any], missing: str) -> None:
    issue = find(issues_of(tmp_path, seq({**step, "edges": END})), "missing-content", "s")
    assert missing in issue.message and step["action"] in issue.message


@pytest.mark.parametrize(("start", "end"), [("09:00", "09:00"), ("17:00", "09:00")])
def test_empty_or_inverted_send_window(tmp_path: Path, start: str, end: str) -> None:
    issues = issues_of(tmp_path, seq(email("mail", END), send_window={"days": ["mon"], "start": start, "end": end}))
    issue = find(issues, "send-window", None)
    assert start in issue.message and end in issue.message


def test_send_window_with_no_days_or_bad_hours(tmp_path: Path) -> None:
    issues = issues_of(tmp_path, seq(email("mail", END), send_window={"days": [], "start": "9am"}))
    text = "\n".join(str(i) for i in issues)
    assert "send_window.days" in text and "send_window.start" in text and "9am" in text


def test_unknown_time_zone(tmp_path: Path) -> None:
    issue = find(issues_of(tmp_path, seq(email("mail", END), timezone="Mars/Olympus_Mons")), "unknown-timezone", None)
    assert "Mars/Olympus_Mons" in issue.message


@pytest.mark.parametrize("bad", ["3x", "-1d", "", "1.5d", "d3", "3 days"])
def test_malformed_duration(tmp_path: Path, bad: str) -> None:
    doc = seq(
        email("mail", [{"trigger": "REPLIED", "to": "done"}, {"trigger": "NOT_REPLIED", "after": bad, "to": "done"}]),
        done(),
    )
    issue = find(issues_of(tmp_path, doc), "malformed-duration", "mail")
    assert repr(bad) in issue.message and "after" in issue.message


def test_malformed_step_delay_and_negative_number(tmp_path: Path) -> None:
    doc = seq(
        email("mail", END, delay="3x"),
    )
    assert "'3x'" in find(issues_of(tmp_path, doc), "malformed-duration", "mail").message
    doc = seq(email("mail", END, delay=-60))
    assert "negative" in find(issues_of(tmp_path, doc), "malformed-duration", "mail").message


def test_durations_parse() -> None:
    assert parse_duration("1d12h").total_seconds() == 36 * 3600
    assert parse_duration(" 90s ").total_seconds() == 90
    assert parse_duration("1w").days == 7
    for bad in ("3x", "-1d", "", "12", "h"):
        with pytest.raises(ValueError, match="malformed duration"):
            parse_duration(bad)


def test_template_syntax_errors_name_step_variant_and_field(tmp_path: Path) -> None:
    doc = seq(
        {
            "id": "intro",
            "action": "SEND_EMAIL",
            "variants": [
                {"name": "A", "subject": "Hi {{ first_name", "body": "ok"},
                {"name": "B", "subject": "fine", "body": "{% if company %}no end"},
            ],
            "edges": END,
        },
        {"id": "dm", "action": "SEND_TWITTER_DM", "text": "{{ first_name | no_such_filter }}", "edges": END},
    )
    doc["steps"][0]["edges"] = [{"trigger": "NORMAL_EDGE", "after": "1d", "to": "dm"}]
    issues = issues_of(tmp_path, doc)
    templates = [i for i in issues if i.rule == "template"]
    assert len(templates) == 3, [str(i) for i in issues]
    a = find(templates, "template", "intro")
    assert "variant 'A' subject" in a.message and "line 1" in a.message
    assert any("variant 'B' body" in i.message for i in templates)
    assert "no_such_filter" in find(templates, "template", "dm").message


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    text = "name: t\nsteps:\n  - id: a\n    action: WAIT\n    edges: [{trigger: END}\n"
    issues = issues_of(tmp_path, text, "broken.yaml")
    assert len(issues) == 1 and issues[0].rule == "syntax"
    assert f"{tmp_path / 'broken.yaml'}:6:" in issues[0].message


def test_yaml_duplicate_key_is_an_error_not_silently_dropped(tmp_path: Path) -> None:
    text = "name: t\nsteps:\n  - id: a\n    action: WAIT\n    action: SEND_EMAIL\n    edges: [{trigger: END}]\n"
    issues = issues_of(tmp_path, text, "dupe.yaml")
    assert issues[0].rule == "syntax" and "dupe.yaml:5:" in issues[0].message and "'action'" in issues[0].message


def test_json_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    text = '{\n  "name": "t",\n  "steps": [\n    {"id": "a" "action": "WAIT"}\n  ]\n}\n'
    issues = issues_of(tmp_path, text, "broken.json")
    assert issues[0].rule == "syntax" and "broken.json:4:" in issues[0].message


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    issues = issues_of(tmp_path, "- just\n- a list\n", "list.yaml")
    assert issues[0].rule == "syntax" and "mapping" in issues[0].message


def test_json_is_accepted(tmp_path: Path) -> None:
    doc = seq(
        email("mail", [{"trigger": "REPLIED", "to": "done"}, {"trigger": "NOT_REPLIED", "after": "3d", "to": "done"}]),
        done(),
    )
    path = tmp_path / "seq.json"
    path.write_text(json.dumps(doc, indent=2))
    defn = validate_file(path)
    assert [s.id for s in defn.steps] == ["mail", "done"]
    assert defn.steps[0].edges[1].after == parse_duration("3d")


def test_several_errors_are_all_reported(tmp_path: Path) -> None:
    doc = seq(
        {"id": "fax", "action": "SEND_FAX", "edges": [{"trigger": "NORMAL_EDGE", "after": "1d", "to": "mail"}]},
        email("mail", [{"trigger": "REPLIED", "to": "ghost"}, {"trigger": "NOT_REPLIED", "after": "3x", "to": "done"}]),
        {"id": "dm", "action": "SEND_TWITTER_DM", "text": "{{ oops", "edges": END},
        {
            "id": "silent",
            "action": "SEND_EMAIL",
            "edges": [
                {"trigger": "FOLLOWED_BACK", "to": "done"},
                {"trigger": "NOT_FOLLOWED_BACK", "after": "1d", "to": "done"},
            ],
        },
        done(),
        done(),
        timezone="Nowhere/Land",
        send_window={"start": "18:00", "end": "08:00"},
    )
    issues = issues_of(tmp_path, doc)
    got = {(i.step, i.rule) for i in issues}
    assert {
        ("fax", "unknown-action"),
        ("mail", "malformed-duration"),
        ("mail", "edge-target"),  # a malformed duration does not hide the step's other errors
        (None, "unknown-timezone"),
        (None, "send-window"),
        ("dm", "unreachable"),
        ("dm", "template"),
        ("silent", "unreachable"),
        ("silent", "missing-content"),
        ("silent", "trigger-fits-action"),
        ("done", "duplicate-step"),
    } <= got, sorted(got, key=str)


def test_graph_errors_without_field_errors_are_all_reported(tmp_path: Path) -> None:
    doc = seq(
        email("mail", [{"trigger": "REPLIED", "to": "ghost"}, {"trigger": "NOT_REPLIED", "to": "done"}]),
        done(),
        email("orphan", END),
        timezone="Nowhere/Land",
    )
    got = {(i.step, i.rule) for i in issues_of(tmp_path, doc)}
    assert got == {
        ("mail", "edge-target"),
        ("mail", "negative-needs-after"),
        ("orphan", "unreachable"),
        (None, "unknown-timezone"),
    }


def test_example_founders_validates() -> None:
    defn = validate_file(ROOT / "examples" / "founders.yaml")
    assert defn.name == "founders"
    assert defn.first_step.id == "follow"
    assert [v.name for v in defn.step("intro_email").variants] == ["A", "B"]


def test_validate_definition_on_dicts_matches_the_file_path() -> None:
    with pytest.raises(SequenceValidationError) as info:
        validate_definition(seq(email("mail", [{"trigger": "NORMAL_EDGE", "to": "nowhere"}])))
    assert [(i.step, i.rule) for i in info.value.issues] == [("mail", "edge-target")]


# ---------------------------------------------------------------------- versions
FOUNDERS_LIKE = """
name: versions-demo
send_window: {days: [mon, tue, wed], start: "09:00", end: "17:00"}
steps:
  - id: intro
    action: SEND_EMAIL
    subject: "Hi {{ first_name }}"
    body: "Hello from us"
    edges:
      - {trigger: REPLIED, to: done}
      - {trigger: NOT_REPLIED, after: 3d, to: done}
  - id: done
    action: WAIT
    edges: [{trigger: END}]
"""

# the same content: keys reordered, flow vs block style, comments, 72h == 3d, day case
REFORMATTED = """
# reformatted by hand
steps:
  - action: SEND_EMAIL
    id: intro
    body: Hello from us
    subject: Hi {{ first_name }}
    edges:
      - trigger: REPLIED
        to: done
      - to: done
        after: 72h
        trigger: NOT_REPLIED
  - {id: done, action: WAIT, edges: [{trigger: END}]}
send_window:
  end: "17:00"
  start: "09:00"
  days: [Mon, Tue, Wed]
name: versions-demo
"""


async def _versions(sf: SessionFactory, name: str) -> list[SequenceVersion]:
    async with sf() as s:
        seq_id = (await s.execute(select(Sequence.id).where(Sequence.name == name))).scalar_one()
        rows = (
            await s.execute(
                select(SequenceVersion).where(SequenceVersion.sequence_id == seq_id).order_by(SequenceVersion.version)
            )
        ).scalars()
        return list(rows)


async def test_same_content_gives_the_same_version(session_factory: SessionFactory, tmp_path: Path) -> None:
    first = await create_version(session_factory, write(tmp_path, FOUNDERS_LIKE, "a.yaml"))
    assert (first.version, first.created) == (1, True)
    again = await create_version(session_factory, write(tmp_path, FOUNDERS_LIKE, "a.yaml"))
    reformatted = await create_version(session_factory, write(tmp_path, REFORMATTED, "b.yaml"))
    as_json = tmp_path / "c.json"
    as_json.write_text(json.dumps(yaml.safe_load(FOUNDERS_LIKE), indent=4, sort_keys=True))
    from_json = await create_version(session_factory, as_json)
    for other in (again, reformatted, from_json):
        assert (other.version, other.version_id, other.created) == (1, first.version_id, False)
    assert len(await _versions(session_factory, "versions-demo")) == 1


async def test_changed_content_gives_a_new_immutable_version(session_factory: SessionFactory, tmp_path: Path) -> None:
    v1 = await create_version(session_factory, write(tmp_path, FOUNDERS_LIKE, "a.yaml"))
    (before,) = await _versions(session_factory, "versions-demo")
    snapshot = (before.id, before.version, before.content_hash, before.definition, before.source, before.created_at)

    v2 = await create_version(
        session_factory, write(tmp_path, FOUNDERS_LIKE.replace("after: 3d", "after: 4d"), "b.yaml")
    )
    v3 = await create_version(
        session_factory, write(tmp_path, FOUNDERS_LIKE.replace("Hello from us", "Hello again"), "c.yaml")
    )
    assert (v2.version, v2.created, v3.version, v3.created) == (2, True, 3, True)
    assert len({v1.version_id, v2.version_id, v3.version_id}) == 3
    # going back to the first content finds version 1 again, not a 4th version
    back = await create_version(session_factory, write(tmp_path, FOUNDERS_LIKE, "d.yaml"))
    assert (back.version, back.version_id, back.created) == (1, v1.version_id, False)

    rows = await _versions(session_factory, "versions-demo")
    assert [r.version for r in rows] == [1, 2, 3]
    old = rows[0]
    assert (old.id, old.version, old.content_hash, old.definition, old.source, old.created_at) == snapshot
    assert old.definition["steps"][0]["edges"][1]["after"] == "3d"
    assert rows[1].definition["steps"][0]["edges"][1]["after"] == "4d"
    latest = await get_version(session_factory, "versions-demo")
    assert latest.version == 3 and latest.definition.step("intro").body == "Hello again"
    first = await get_version(session_factory, "versions-demo", 1)
    assert first.definition.step("intro").body == "Hello from us"


async def test_an_invalid_file_stores_nothing(session_factory: SessionFactory, tmp_path: Path) -> None:
    with pytest.raises(SequenceValidationError):
        await create_version(session_factory, write(tmp_path, FOUNDERS_LIKE.replace("to: done}", "to: nowhere}", 1)))
    async with session_factory() as s:
        assert (await s.execute(select(SequenceVersion))).first() is None
        assert (await s.execute(select(Sequence))).first() is None
