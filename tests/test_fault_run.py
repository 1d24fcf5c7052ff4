"""The fault run in the suite: ≥100 leads on the Temporal dev server while the real worker
process is SIGKILLed every few seconds and restarted, and the SMTP server answers 451 to a
fifth of the messages.

The verdict is what the SMTP server accepted (raw bytes, by Message-ID) against the ledger:
no message twice, every lead finished, and every message that is not at the server has a
ledger row saying why. The run is bounded (a deadline) and its figures are printed; the
full run with a server restart is `make bench` (bench/fault.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.fault import run_fault_campaign
from db.session import SessionFactory

pytestmark = pytest.mark.devserver


async def test_sigkilled_worker_and_smtp_451s_lose_nothing_and_send_nothing_twice(
    dev_env: Any, session_factory: SessionFactory, database_url: str, tmp_path: Path
) -> None:
    target = dev_env.client.service_client.config.target_host
    report = await run_fault_campaign(
        session_factory=session_factory,
        database_url=database_url,
        temporal_address=target,
        tmp=tmp_path,
        leads=100,
        kills=6,
        kill_every=(2.0, 4.0),
        fail_share=0.2,
        deadline_seconds=240,
    )
    print(report.line())
    assert report.kills == 6 and report.refused_451 > 0, "the faults happened"
    assert report.duplicates == 0, report.problems
    assert report.unfinished == 0, f"{report.unfinished} leads never finished: {report.problems}"
    assert report.unrecorded == 0, report.problems
    assert report.accepted + report.uncertain + report.failed >= report.messages_expected
    assert not report.problems, report.problems
