"""The people CSV import against a real PostgreSQL database.

Line numbers are physical lines of the file, the header being line 1; a record whose
quoted cell spans several lines is reported at the line where it starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from db.session import SessionFactory
from db.tables import Event, Identity, Person, Segment, SegmentMember
from services.people_import import import_people
from tests.engine_harness import make_person

HEADER = "email,first_name,last_name,company,timezone,x_user_id,x_handle,linkedin_url,xmtp_address,role,city"


def csv_file(tmp_path: Path, *lines: str, name: str = "people.csv", header: str = HEADER) -> Path:
    path = tmp_path / name
    path.write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")
    return path


async def snapshot(sf: SessionFactory) -> dict[str, Any]:
    """Everything the import may touch, in a comparable form."""
    async with sf() as s:
        people = [
            (p.id, p.first_name, p.last_name, p.company, p.timezone, p.fields)
            for p in (await s.execute(select(Person).order_by(Person.id))).scalars()
        ]
        identities = [
            (i.id, i.person_id, i.channel, i.value)
            for i in (await s.execute(select(Identity).order_by(Identity.id))).scalars()
        ]
        members = sorted((await s.execute(select(SegmentMember.segment_id, SegmentMember.person_id))).all())
        segments = sorted((await s.execute(select(Segment.id, Segment.name, Segment.kind))).all())
        events = (await s.execute(select(func.count()).select_from(Event))).scalar_one()
    return {"people": people, "identities": identities, "members": members, "segments": segments, "events": events}


async def person_by_email(sf: SessionFactory, email: str) -> Person:
    async with sf() as s:
        return (
            await s.execute(select(Person).join(Identity).where(Identity.channel == "email", Identity.value == email))
        ).scalar_one()


async def identities_of(sf: SessionFactory, person_id: int) -> dict[str, str]:
    async with sf() as s:
        rows = await s.execute(select(Identity.channel, Identity.value).where(Identity.person_id == person_id))
        return {c: v for c, v in rows.all()}


async def members_of(sf: SessionFactory, segment: str) -> set[int]:
    async with sf() as s:
        rows = await s.execute(select(SegmentMember.person_id).join(Segment).where(Segment.name == segment))
        return set(rows.scalars())


async def test_bad_lines_are_reported_by_line_and_good_lines_land(
    session_factory: SessionFactory, tmp_path: Path
) -> None:
    sf = session_factory
    owner = await make_person(sf, email="owner@acme.example", first_name="Olga")
    path = csv_file(
        tmp_path,
        "ada@analytical.example,Ada,Lovelace,Analytical,Europe/London,1100000001,ada_l,,,CTO,London",  # 2 good
        "not-an-email,Bad,Email,X,UTC,,,,,,",  # 3
        ",No,Identity,Nowhere,UTC,,,,,CEO,Paris",  # 4
        "tz@example.com,Tim,Zone,Clock,Mars/Olympus,,,,,,",  # 5
        "owner@acme.example,Olga,Other,Acme,UTC,,stolen_handle,,,,",  # 6: fine, it is Olga's own email
        "grace@cobol.example,Grace,Hopper,Cobol,America/New_York,,Stolen_Handle,,,CEO,NYC",  # 7: handle is Olga's
        '"multi@line.example",Multi,"Line',  # 8-9: a quoted cell spanning two lines
        'Name",Co,UTC,,,,,,',
        "short,row",  # 10
        ",,,,,,,,,,",  # 11: blank: skipped, not an error
        "alan@bletchley.example,Alan,Turing,Bletchley,Europe/London,,,linkedin.com/in/Alan-Turing/,,,",  # 12 good
    )
    report = await import_people(sf, path, "launch")
    bad = {e.line: e.reason for e in report.errors}
    assert sorted(bad) == [3, 4, 5, 7, 10], report.errors
    assert "email" in bad[3] and "not-an-email" in bad[3]
    assert "no identity" in bad[4]
    assert "Mars/Olympus" in bad[5] and "time zone" in bad[5]
    assert f"x_handle 'stolen_handle' belongs to person {owner}" in bad[7]
    assert "columns" in bad[10]
    assert (report.rows, report.created, report.updated, report.unchanged) == (9, 3, 1, 0)

    ada = await person_by_email(sf, "ada@analytical.example")
    multi = await person_by_email(sf, "multi@line.example")
    alan = await person_by_email(sf, "alan@bletchley.example")
    assert multi.last_name == "Line\nName"
    assert await identities_of(sf, alan.id) == {
        "email": "alan@bletchley.example",
        "linkedin": "https://www.linkedin.com/in/alan-turing",
    }
    assert await identities_of(sf, owner) == {"email": "owner@acme.example", "x_handle": "stolen_handle"}
    # the static segment is a snapshot of exactly the good rows
    assert await members_of(sf, "launch") == {ada.id, multi.id, alan.id, owner}
    assert report.members == 4
    # no person or identity of any bad line exists
    async with sf() as s:
        emails = set((await s.execute(select(Identity.value).where(Identity.channel == "email"))).scalars())
        assert emails == {
            "ada@analytical.example",
            "multi@line.example",
            "alan@bletchley.example",
            "owner@acme.example",
        }
        assert (await s.execute(select(func.count()).select_from(Person))).scalar_one() == 4


async def test_every_reason_of_a_line_is_reported(session_factory: SessionFactory, tmp_path: Path) -> None:
    path = csv_file(tmp_path, f"bad@@mail,{'x' * 201},L,C,Not/AZone,12ab,,,,,")
    report = await import_people(session_factory, path, "s")
    (error,) = report.errors
    assert error.line == 2
    for part in ("email", "first_name", "200", "x_user_id", "Not/AZone"):
        assert part in error.reason, error.reason
    assert (await snapshot(session_factory))["people"] == []


async def test_custom_columns_land_in_fields(session_factory: SessionFactory, tmp_path: Path) -> None:
    path = csv_file(
        tmp_path,
        "Ada@Analytical.Example,Ada,Lovelace,Analytical,Europe/London,,,,,CTO,London",
        "grace@cobol.example,Grace,Hopper,Cobol,America/New_York,,,,,,",
    )
    report = await import_people(session_factory, path, "s")
    assert report.errors == []
    ada = await person_by_email(session_factory, "ada@analytical.example")
    grace = await person_by_email(session_factory, "grace@cobol.example")
    assert ada.fields == {"role": "CTO", "city": "London"}
    assert (ada.first_name, ada.last_name, ada.company, ada.timezone) == (
        "Ada",
        "Lovelace",
        "Analytical",
        "Europe/London",
    )
    assert grace.fields == {}, "empty custom cells are not stored"
    async with session_factory() as s:  # and they are queryable as JSONB
        found = (await s.execute(select(Person.id).where(Person.fields["role"].astext == "CTO"))).scalars().all()
    assert found == [ada.id]


async def test_reimporting_the_same_file_changes_nothing(session_factory: SessionFactory, tmp_path: Path) -> None:
    path = csv_file(
        tmp_path,
        "ada@analytical.example,Ada,Lovelace,Analytical,Europe/London,1100000001,ada_l,,,CTO,London",
        "grace@cobol.example,Grace,Hopper,Cobol,America/New_York,,amazing_grace,,,CEO,NYC",
        "bad-email,X,Y,Z,UTC,,,,,,",
        ",,,,,,,https://www.linkedin.com/in/alan-turing,0x" + "ab" * 20 + ",,",
    )
    first = await import_people(session_factory, path, "wave")
    assert (first.created, first.updated, first.unchanged, len(first.errors)) == (3, 0, 0, 1)
    before = await snapshot(session_factory)
    second = await import_people(session_factory, path, "wave")
    assert (second.rows, second.created, second.updated, second.unchanged) == (4, 0, 0, 3)
    assert [(e.line, e.reason) for e in second.errors] == [(e.line, e.reason) for e in first.errors]
    assert second.segment_id == first.segment_id and second.members == first.members == 3
    after = await snapshot(session_factory)
    assert after == before
    assert len(after["members"]) == 3 and after["events"] == 0


async def test_identities_are_normalized(session_factory: SessionFactory, tmp_path: Path) -> None:
    first = csv_file(
        tmp_path,
        "Ada.Lovelace@Analytical.EXAMPLE,Ada,,,,,@Ada_L,https://WWW.LinkedIn.com/in/Ada-Lovelace/?trk=x,,,",
        name="a.csv",
    )
    assert (await import_people(session_factory, first, "a")).created == 1
    ada = await person_by_email(session_factory, "ada.lovelace@analytical.example")
    assert await identities_of(session_factory, ada.id) == {
        "email": "ada.lovelace@analytical.example",
        "x_handle": "ada_l",
        "linkedin": "https://www.linkedin.com/in/ada-lovelace",
    }
    # the same person through another spelling of each identity: matched, not duplicated
    second = csv_file(
        tmp_path,
        "ada.lovelace@analytical.example,Ada,Lovelace,,,,ADA_L,,,,",
        ",,,,,,ada_l,,,,",
        "ADA.LOVELACE@analytical.example,,,,,,,,,,",
        name="b.csv",
    )
    report = await import_people(session_factory, second, "b")
    assert report.errors == [] and report.created == 0 and report.members == 1
    async with session_factory() as s:
        assert (await s.execute(select(func.count()).select_from(Person))).scalar_one() == 1
        assert (await s.execute(select(func.count()).select_from(Identity))).scalar_one() == 3
    refreshed = await person_by_email(session_factory, "ada.lovelace@analytical.example")
    assert refreshed.last_name == "Lovelace"


async def test_a_failing_row_leaves_nothing_half_written(session_factory: SessionFactory, tmp_path: Path) -> None:
    sf = session_factory
    ada = await make_person(sf, email="ada@analytical.example", first_name="Ada")
    grace = await make_person(sf, email="grace@cobol.example", first_name="Grace")
    async with sf() as s, s.begin():
        s.add(Identity(person_id=ada, channel="x_handle", value="ada_l"))
    before = await snapshot(sf)
    path = csv_file(
        tmp_path,
        # Ada's email with a new name, a new X id (added first), then a handle that differs from hers
        "ada@analytical.example,Renamed,,,,4242,other_handle,https://www.linkedin.com/in/new-ada,,Boss,",
        # two identities owned by two different people
        "ada@analytical.example,Ada,,,,,,,,,",
        "grace@cobol.example,Grace,,,,,ada_l,,,,",
        # a new person whose x handle belongs to Ada: refused, no new person left behind
        "new@person.example,New,,,,,ada_l,,,,",
    )
    report = await import_people(sf, path, "s")
    bad = {e.line: e.reason for e in report.errors}
    assert sorted(bad) == [2, 4, 5]
    assert f"email 'ada@analytical.example' belongs to person {ada}, who already has x_handle 'ada_l'" in bad[2]
    assert f"person {ada}" in bad[4] and f"person {grace}" in bad[4]
    assert "different people" in bad[4]
    assert f"person {ada}" in bad[5]
    after = await snapshot(sf)
    assert after["people"] == before["people"], "Ada was not renamed and no new person exists"
    assert after["identities"] == before["identities"], "no LinkedIn identity was added for Ada"
    assert after["members"] == [(report.segment_id, ada)] and report.unchanged == 1


async def test_header_columns_are_matched_case_insensitively(session_factory: SessionFactory, tmp_path: Path) -> None:
    path = csv_file(
        tmp_path,
        "ada@analytical.example,Ada,Analytical,CTO",
        header="Email,First Name,Company,Job Title",
    )
    report = await import_people(session_factory, path, "s")
    assert report.errors == []
    ada = await person_by_email(session_factory, "ada@analytical.example")
    assert (ada.first_name, ada.company, ada.fields) == ("Ada", "Analytical", {"Job Title": "CTO"})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty"),
        ("first_name,company\nAda,Acme\n", "no identity column"),
        ("email,email\na@b.co,c@d.co\n", "duplicate header"),
    ],
)
async def test_unusable_files_are_refused_whole(
    session_factory: SessionFactory, tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        await import_people(session_factory, path, "s")
    assert (await snapshot(session_factory))["segments"] == []


async def test_segment_is_replaced_by_the_new_snapshot(session_factory: SessionFactory, tmp_path: Path) -> None:
    one = csv_file(tmp_path, "a@x.example,A,,,,,,,,,", "b@x.example,B,,,,,,,,,", name="one.csv")
    two = csv_file(tmp_path, "b@x.example,B,,,,,,,,,", "c@x.example,C,,,,,,,,,", name="two.csv")
    await import_people(session_factory, one, "wave")
    await import_people(session_factory, two, "wave")
    b = await person_by_email(session_factory, "b@x.example")
    c = await person_by_email(session_factory, "c@x.example")
    assert await members_of(session_factory, "wave") == {b.id, c.id}
    async with session_factory() as s:
        assert (await s.execute(select(func.count()).select_from(Person))).scalar_one() == 3
