"""The CSV row model: typed columns, normalized identities, every problem at once."""

from __future__ import annotations

import pytest

from services.person_row import PersonRow, RowProblems


def test_a_good_row_is_typed_and_normalized() -> None:
    row = PersonRow.from_cells(
        {
            "email": " Ada@Analytical.Example ",
            "first_name": "Ada",
            "timezone": "Europe/London",
            "x_handle": "@Ada_L",
            "title": "CTO",
            "company": "",
        }
    )
    assert row.identities == {"email": "ada@analytical.example", "x_handle": "ada_l"}
    assert row.person_values() == {"first_name": "Ada", "timezone": "Europe/London"}
    assert row.custom == {"title": "CTO"}


def test_every_problem_is_named_with_its_column() -> None:
    with pytest.raises(RowProblems) as err:
        PersonRow.from_cells(
            {"email": "bad@@mail", "first_name": "x" * 201, "timezone": "Not/AZone", "x_user_id": "1a"}
        )
    reason = str(err.value)
    for part in ("email:", "x_user_id:", "first_name: longer than 200 characters", "timezone: unknown time zone"):
        assert part in reason, reason


def test_a_row_without_identity_is_refused() -> None:
    with pytest.raises(RowProblems, match="no identity: fill at least one of email"):
        PersonRow.from_cells({"first_name": "Nobody"})
