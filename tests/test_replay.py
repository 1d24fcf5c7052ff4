"""Replay saved histories against today's workflow code.

If a change to `workflows/` would break determinism for enrollments already running
(reordering steps, adding an activity call without `workflow.patched`), replaying
these histories fails and so does CI. Regenerate them only on purpose:
`python -m tests.histories.generate`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from workflows.audience import AudienceWorkflow
from workflows.enrollment import EnrollmentWorkflow

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))


def test_histories_are_present() -> None:
    names = {p.stem for p in HISTORIES}
    assert {
        "enrollment_reply",
        "enrollment_timeouts_pause",
        "enrollment_continue_as_new",
        "audience",
        "enrollment_send_gate",
    } <= names


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_replay(path: Path) -> None:
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    replayer = Replayer(workflows=[EnrollmentWorkflow, AudienceWorkflow], data_converter=pydantic_data_converter)
    result = await replayer.replay_workflow(history, raise_on_replay_failure=True)
    assert result.replay_failure is None
