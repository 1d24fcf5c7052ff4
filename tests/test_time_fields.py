"""Time zones and send-window hours are typed, and written back exactly as they were read."""

from __future__ import annotations

import json
from datetime import time
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from models.enrollment import EnrollmentInput
from models.sequence import SendWindow, SequenceDefinition
from models.sequence_checks import check_definition
from services.person_row import PersonRow

DOC = {
    "name": "typed",
    "timezone": "Europe/Berlin",
    "send_window": {"days": ["mon", "fri"], "start": "08:05", "end": "17:30"},
    "steps": [{"id": "mail", "action": "SEND_EMAIL", "subject": "Hi", "body": "Hello", "edges": [{"trigger": "END"}]}],
}


def test_fields_are_typed() -> None:
    defn = SequenceDefinition.model_validate(DOC)
    assert defn.timezone == ZoneInfo("Europe/Berlin")
    assert defn.send_window is not None
    assert (defn.send_window.start, defn.send_window.end) == (time(8, 5), time(17, 30))
    assert defn.send_window.hours() == "08:05-17:30"
    assert SequenceDefinition.model_validate({**DOC, "timezone": ZoneInfo("Asia/Tokyo")}).timezone.key == "Asia/Tokyo"


def test_serialized_as_written_so_saved_inputs_read_the_same() -> None:
    """The JSON (database copy, workflow input) keeps "HH:MM" and the zone's name."""
    defn = SequenceDefinition.model_validate(DOC)
    dumped = json.loads(defn.model_dump_json())
    assert dumped["timezone"] == "Europe/Berlin"
    assert dumped["send_window"] == {"days": ["mon", "fri"], "start": "08:05", "end": "17:30"}
    assert defn.model_dump()["send_window"]["start"] == "08:05"
    assert SequenceDefinition.model_validate_json(defn.model_dump_json()) == defn
    # the defaults, as every history recorded before this change carries them
    assert json.loads(SendWindow().model_dump_json()) == {
        "days": ["mon", "tue", "wed", "thu", "fri"],
        "start": "09:00",
        "end": "17:30",
    }
    utc = SequenceDefinition.model_validate({**DOC, "timezone": "UTC"})
    assert json.loads(utc.model_dump_json())["timezone"] == "UTC"


def test_workflow_input_with_a_window_round_trips() -> None:
    raw = {
        "enrollment_id": 1,
        "person_id": 2,
        "sequence": {"sequence_id": 3, "sequence_name": "typed", "version_id": 4, "version": 1},
        "definition": DOC,
    }
    inp = EnrollmentInput.model_validate(raw)
    again = EnrollmentInput.model_validate_json(inp.model_dump_json())
    assert again.definition.send_window == inp.definition.send_window
    assert again.definition.timezone == inp.definition.timezone


@pytest.mark.parametrize("bad", ["9am", "24:00", "9:00", "09:00:00", "", 1050, 9.5])
def test_bad_hours_name_the_value_and_the_field(bad: object) -> None:
    defn, issues = check_definition({**DOC, "send_window": {"start": bad}})
    assert defn is None
    (issue,) = issues
    assert issue.message.startswith("send_window.start:") and repr(bad) in issue.message
    assert "HH:MM" in issue.message


def test_unquoted_yaml_hours_get_a_hint() -> None:
    _, issues = check_definition({**DOC, "send_window": {"start": "09:00", "end": 1050}})
    assert "quote it in YAML" in issues[0].message and "send_window.end" in issues[0].message


@pytest.mark.parametrize("bad", ["Mars/Olympus_Mons", "", "../etc/passwd", 5])
def test_unknown_zone_names_the_value_and_the_field(bad: object) -> None:
    defn, issues = check_definition({**DOC, "timezone": bad})
    assert defn is None
    (issue,) = issues
    assert issue.rule == "unknown-timezone" and issue.step is None
    assert issue.message.startswith("timezone:") and repr(bad) in issue.message


def test_person_rows_check_their_zone() -> None:
    assert PersonRow.model_validate({"timezone": "America/New_York"}).timezone == "America/New_York"
    with pytest.raises(ValidationError, match="unknown time zone 'Moon/Base'"):
        PersonRow.model_validate({"timezone": "Moon/Base"})


def test_days_are_weekdays_written_short() -> None:
    window = SendWindow.model_validate({"days": ["Monday", " FRI "], "start": "09:00", "end": "10:00"})
    assert window.days == ["mon", "fri"] and window.weekday_numbers() == {0, 4}
    assert json.loads(window.model_dump_json())["days"] == ["mon", "fri"]
    _, issues = check_definition({**DOC, "send_window": {"days": ["mon", "funday", 3]}})
    assert "send_window.days" in issues[0].message and "'funday'" in issues[0].message and "3" in issues[0].message
