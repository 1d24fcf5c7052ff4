"""The enrollment's state model: stages, and states written before stages existed."""

from __future__ import annotations

import pytest

from models.enrollment import EnrollmentState, Phase, Stage


@pytest.mark.parametrize(
    ("step_started", "action_done", "stage"),
    [(False, False, Stage.BEGIN), (True, False, Stage.ACT), (True, True, Stage.WAIT)],
)
def test_a_state_from_before_stages_gets_its_stage_from_the_flags(
    step_started: bool, action_done: bool, stage: Stage
) -> None:
    old = {"current_step": "s", "step_started": step_started, "action_done": action_done}
    assert EnrollmentState.model_validate(old).stage == stage


def test_a_new_state_begins_and_keeps_its_stage_across_a_round_trip() -> None:
    state = EnrollmentState(current_step="s")
    assert state.stage == Stage.BEGIN
    state.stage = Stage.WAIT
    assert EnrollmentState.model_validate_json(state.model_dump_json()).stage == Stage.WAIT


def test_phases_read_as_the_strings_users_already_match() -> None:
    assert Phase.WAITING.value == "waiting" and Phase.WAITING_FOR_SLOT.value == "waiting for send slot"
    assert f"{Phase.WAITING}" == "waiting" and str(Phase.WAITING_FOR_SLOT) == "waiting for send slot"
    assert Phase("scheduled") is Phase.SCHEDULED
