"""`starter.py` as users run it (a subprocess against the test's database), and dry runs.

The CLI reads DATABASE_URL from the environment like every other process; each test
points it at its own freshly migrated database.
"""

from __future__ import annotations

import re
from pathlib import Path

from sqlalchemy import func, select
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from db.session import SessionFactory
from db.tables import Delivery, Enrollment, Event, Identity, Person, Sequence, SequenceVersion, Suppression
from models.schedule import choose_variant
from models.sequence import SequenceDefinition
from operations.enrolling import dry_run
from services.people_import import import_people
from services.sequence_store import create_version, get_version
from tests.cli_harness import ROOT, cli
from tests.engine_harness import store_version
from tests.mail_servers import SmtpRecorder
from workflows.enrollment import workflow_id_for

BAD_SEQUENCE = """\
name: bad-one
timezone: Atlantis/Capital
steps:
  - id: opener
    action: SEND_FAX
    edges: [{trigger: NORMAL_EDGE, after: 1d, to: mail}]
  - id: mail
    action: SEND_EMAIL
    subject: "Hi {{ first_name }}"
    body: "Hello"
    edges:
      - {trigger: FOLLOWED_BACK, to: done}
      - {trigger: NOT_FOLLOWED_BACK, after: 3x, to: done}
  - id: done
    action: WAIT
    edges: [{trigger: END}]
"""

GOOD_SEQUENCE = """\
name: cli-demo
steps:
  - id: intro
    action: SEND_EMAIL
    variants:
      - {name: A, weight: 1, subject: "Quick question, {{ first_name }}", body: "As {{ role }} ..."}
      - {name: B, weight: 1, subject: "{{ company }} + us", body: "Hello {{ first_name }}"}
    edges:
      - {trigger: REPLIED, to: done}
      - {trigger: NOT_REPLIED, after: 3d, to: nudge}
  - id: nudge
    action: SEND_EMAIL
    subject: "Re: Quick question"
    body: "Bumping this, {{ first_name }}. How is {{ city }}?"
    edges:
      - {trigger: REPLIED, to: done}
      - {trigger: NOT_REPLIED, after: 4d, to: done}
  - id: done
    action: WAIT
    edges: [{trigger: END}]
"""


# ---------------------------------------------------------------------- sequences
async def test_validate_bad_file_exits_nonzero_naming_step_and_rule(database_url: str, tmp_path: Path) -> None:
    path = tmp_path / "BAD.yaml"
    path.write_text(BAD_SEQUENCE)
    result = await cli(database_url, "sequences", "validate", str(path))
    assert result.code == 1, result
    for step, rule in (
        ("opener", "unknown-action"),
        ("mail", "trigger-fits-action"),
        ("mail", "malformed-duration"),
    ):
        assert re.search(rf"step '{step}': .*\[{rule}\]", result.err), (step, rule, result.err)
    assert "Atlantis/Capital" in result.err and "[unknown-timezone]" in result.err
    assert "SEND_FAX" in result.err and "'3x'" in result.err


async def test_validate_syntax_error_names_file_and_line(database_url: str, tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nsteps:\n  - id: a\n    action: WAIT\n   edges: [oops\n")
    result = await cli(database_url, "sequences", "validate", str(path))
    assert result.code == 1
    assert f"{path}:5:" in result.err and "[syntax]" in result.err


async def test_validate_good_file(database_url: str, tmp_path: Path) -> None:
    result = await cli(database_url, "sequences", "validate", str(ROOT / "examples" / "founders.yaml"))
    assert result.code == 0, result
    assert "ok" in result.out and "'founders'" in result.out and "8 steps" in result.out


async def test_sequences_create_prints_the_version(
    database_url: str, session_factory: SessionFactory, tmp_path: Path
) -> None:
    path = tmp_path / "seq.yaml"
    path.write_text(GOOD_SEQUENCE)
    first = await cli(database_url, "sequences", "create", str(path))
    assert first.code == 0, first
    assert "sequence 'cli-demo': created version 1" in first.out
    again = await cli(database_url, "sequences", "create", str(path))
    assert again.code == 0 and "unchanged, existing version 1" in again.out
    path.write_text(GOOD_SEQUENCE.replace("after: 4d", "after: 5d"))
    changed = await cli(database_url, "sequences", "create", str(path))
    assert changed.code == 0 and "created version 2" in changed.out
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_SEQUENCE)
    refused = await cli(database_url, "sequences", "create", str(bad))
    assert refused.code == 1 and "[unknown-action]" in refused.err
    async with session_factory() as s:
        names = set((await s.execute(select(Sequence.name))).scalars())
        versions = sorted((await s.execute(select(SequenceVersion.version))).scalars())
    assert names == {"cli-demo"} and versions == [1, 2]


# ---------------------------------------------------------------------- people
async def test_people_import_reports_bad_lines_and_keeps_good_ones(
    database_url: str, session_factory: SessionFactory, tmp_path: Path
) -> None:
    path = tmp_path / "people.csv"
    path.write_text(
        "email,first_name,company,timezone,x_handle,role\n"
        "ada@analytical.example,Ada,Analytical,Europe/London,@ada_l,CTO\n"  # 2
        "ada-at-nowhere,Bad,Email,UTC,,\n"  # 3
        ",Nobody,Anon,UTC,,\n"  # 4
        "grace@cobol.example,Grace,Cobol,Moon/Base,,\n"  # 5
        "alan@bletchley.example,Alan,Bletchley,Europe/London,,[Head] of research\n"  # 6
    )
    result = await cli(database_url, "people", "import", str(path), "--segment", "launch")
    assert result.code == 1, result
    assert "5 rows: 2 created, 0 updated, 0 unchanged, 3 bad; segment 'launch' has 2 people" in result.out
    lines = {int(m.group(1)): m.group(2) for m in re.finditer(r"line (\d+): (.*)", result.err)}
    assert sorted(lines) == [3, 4, 5]
    assert "ada-at-nowhere" in lines[3] and "no identity" in lines[4] and "Moon/Base" in lines[5]
    async with session_factory() as s:
        people = {p.first_name: p for p in (await s.execute(select(Person))).scalars()}
    assert set(people) == {"Ada", "Alan"}
    assert people["Alan"].fields == {"role": "[Head] of research"}

    # the same file again: the same report, nothing new
    again = await cli(database_url, "people", "import", str(path), "--segment", "launch")
    assert again.code == 1
    assert "5 rows: 0 created, 0 updated, 2 unchanged, 3 bad" in again.out
    clean = tmp_path / "clean.csv"
    clean.write_text("email,first_name\nada@analytical.example,Ada\n")
    ok = await cli(database_url, "people", "import", str(clean), "--segment", "ada-only")
    assert ok.code == 0, ok
    assert "1 rows: 0 created, 0 updated, 1 unchanged, 0 bad; segment 'ada-only' has 1 people" in ok.out


async def test_people_import_of_a_missing_segment_name_or_unusable_file(database_url: str, tmp_path: Path) -> None:
    path = tmp_path / "no-identity.csv"
    path.write_text("first_name,company\nAda,Acme\n")
    result = await cli(database_url, "people", "import", str(path), "--segment", "s")
    assert result.code == 2 and "names no identity column" in result.err


# ---------------------------------------------------------------------- dry run
async def _audience(sf: SessionFactory, tmp_path: Path) -> dict[str, int]:
    """The cli-demo sequence and a segment `launch` with one person of each kind."""
    seq_path = tmp_path / "seq.yaml"
    seq_path.write_text(GOOD_SEQUENCE)
    await create_version(sf, seq_path)
    csv_path = tmp_path / "people.csv"
    csv_path.write_text(
        "email,first_name,company,x_user_id,role,city\n"
        "ada@analytical.example,Ada,Analytical,,CTO,London\n"
        "grace@cobol.example,Grace,Cobol,,,New York\n"  # no role: variant A cannot render
        "alan@bletchley.example,Alan,Bletchley,,CEO,\n"  # no city: the second email cannot render
        ",Kath,Orbit,1100000004,CFO,Hampton\n"  # no email: the email steps would be skipped
        "hedy@suppressed.example,Hedy,Films,,CEO,Vienna\n"  # suppressed
        "busy@elsewhere.example,Busy,Else,,CEO,Lyon\n"  # active in another sequence
    )
    report = await import_people(sf, csv_path, "launch")
    assert report.errors == [] and report.members == 6
    async with sf() as s:
        ids = {p.first_name or "": p.id for p in (await s.execute(select(Person).order_by(Person.id))).scalars()}
    other_ref, _ = await store_version(
        sf, {"name": "other", "steps": [{"id": "w", "action": "WAIT", "edges": [{"trigger": "END"}]}]}
    )
    async with sf() as s, s.begin():
        s.add(Suppression(person_id=ids["Hedy"], reason="unsubscribed", source="test"))
        s.add(
            Enrollment(
                sequence_id=other_ref.sequence_id,
                sequence_version_id=other_ref.version_id,
                person_id=ids["Busy"],
                workflow_id="other-busy",
            )
        )
    return ids


async def _counts(sf: SessionFactory) -> tuple[int, int, int]:
    async with sf() as s:
        return (
            (await s.execute(select(func.count()).select_from(Enrollment))).scalar_one(),
            (await s.execute(select(func.count()).select_from(Delivery))).scalar_one(),
            (await s.execute(select(func.count()).select_from(Event))).scalar_one(),
        )


async def test_dry_run_renders_first_messages_reports_problems_and_sends_nothing(
    session_factory: SessionFactory,
    tmp_path: Path,
    smtp_server: SmtpRecorder,
    temporal_env: WorkflowEnvironment,
) -> None:
    sf = session_factory
    ids = await _audience(sf, tmp_path)
    before = await _counts(sf)
    connections = smtp_server.connections  # the fixture's own readiness probe
    report = await dry_run(sf, "cli-demo", "launch")

    assert report.people == 6
    problems = {(p.person_id, p.step) for p in report.issues}
    assert problems == {
        (ids["Grace"], "intro"),  # variant A needs role, whichever variant Grace would get
        (ids["Alan"], "nudge"),  # not a first message, but enroll would refuse Alan for it
        (ids["Busy"], None),
    }, report.problems
    text = "\n".join(report.problems)
    assert f"person {ids['Grace']}, step 'intro': variant 'A' text: template variable 'role'" in text
    assert f"person {ids['Alan']}, step 'nudge'" in text and "'city'" in text
    assert f"person {ids['Busy']}: already in an active enrollment (other-busy)" in text
    warnings = "\n".join(report.warnings)
    assert f"person {ids['Hedy']}: suppressed (unsubscribed)" in warnings
    assert f"person {ids['Kath']}, step 'intro': no email identity" in warnings

    previews = {(p.person_id, p.step): p for p in report.previews}
    # first messages only, for everyone who is not suppressed and whose first message renders
    assert set(previews) == {(ids[n], "intro") for n in ("Ada", "Alan", "Kath", "Busy")}
    intro = (await _definition(sf)).step("intro")
    for name, pid in ids.items():
        if (pid, "intro") not in previews:
            continue
        chosen = choose_variant(intro.variants, key=f"{pid}:intro")
        assert chosen is not None
        preview = previews[(pid, "intro")]
        assert preview.variant == chosen.name
        expected = f"Quick question, {name}" if chosen.name == "A" else f"{preview_company(name)} + us"
        assert preview.preview == expected
    assert previews[(ids["Ada"], "intro")].to == "ada@analytical.example"
    assert previews[(ids["Kath"], "intro")].to is None

    # nothing was sent, written or started
    assert smtp_server.messages == [] and smtp_server.connections == connections
    assert await _counts(sf) == before
    for pid in ids.values():
        try:
            await temporal_env.client.get_workflow_handle(workflow_id_for("cli-demo", pid)).describe()
            raise AssertionError(f"a workflow exists for person {pid}")
        except RPCError as err:
            assert err.status == RPCStatusCode.NOT_FOUND


def preview_company(name: str) -> str:
    return {"Ada": "Analytical", "Alan": "Bletchley", "Kath": "Orbit", "Busy": "Else"}[name]


async def _definition(sf: SessionFactory) -> SequenceDefinition:
    return (await get_version(sf, "cli-demo")).definition


async def test_enroll_dry_run_cli(database_url: str, session_factory: SessionFactory, tmp_path: Path) -> None:
    sf = session_factory
    ids = await _audience(sf, tmp_path)
    before = await _counts(sf)
    result = await cli(database_url, "enroll", "--sequence", "cli-demo", "--segment", "launch", "--dry-run")
    assert result.code == 1, result
    assert "nothing sent" in result.out
    assert "6 people, 4 messages rendered, 3 problems, 2 warnings" in result.out
    assert f"problem person {ids['Grace']}, step 'intro': variant 'A' text: template variable 'role'" in result.err
    assert f"warning person {ids['Hedy']}: suppressed" in result.err
    assert await _counts(sf) == before

    # fix the audience: only warnings remain, and the exit code says it is fine to enroll
    async with sf() as s, s.begin():
        for name in ("Grace", "Alan", "Busy"):
            person = await s.get(Person, ids[name])
            assert person is not None
            await s.delete(person)
    ok = await cli(database_url, "enroll", "--sequence", "cli-demo", "--segment", "launch", "--dry-run")
    assert ok.code == 0, ok
    assert "3 people, 2 messages rendered, 0 problems, 2 warnings" in ok.out
    async with sf() as s:
        assert (await s.execute(select(func.count()).select_from(Identity))).scalar_one() == 3


async def test_enroll_dry_run_of_unknown_sequence_or_segment(database_url: str, tmp_path: Path) -> None:
    result = await cli(database_url, "enroll", "--sequence", "nope", "--segment", "s", "--dry-run")
    assert result.code == 2 and "unknown sequence 'nope'" in result.err


async def test_senders_pause_list_and_resume(database_url: str, session_factory: SessionFactory) -> None:
    from tests.engine_harness import make_sender

    sender_id = await make_sender(session_factory, "email", "sales@acme.test")
    paused = await cli(database_url, "senders", "pause", str(sender_id), "--reason", "DNS move")
    assert paused.code == 0, paused.err
    assert "paused (manual)" in paused.out and "DNS move" in paused.out
    listed = await cli(database_url, "senders", "list")
    assert "paused (manual)" in listed.out and "DNS move" in listed.out
    resumed = await cli(database_url, "senders", "resume", str(sender_id))
    assert resumed.code == 0 and "resumed" in resumed.out
    assert "paused" not in (await cli(database_url, "senders", "list")).out
    unknown = await cli(database_url, "senders", "resume", "999")
    assert unknown.code != 0 and "sender 999: no such sender account" in unknown.err
