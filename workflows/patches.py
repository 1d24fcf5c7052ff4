"""Patch markers only where a history can need them.

`workflow.patched(id)` records a marker, and the server a TemporalChangeVersion
search-attribute upsert, the first time a run takes a patch's newer path, so that a
replay of that history takes it again. A run whose code had the patch from its first
task never takes the older path: for it the marker says nothing a replay needs, yet
each one costs the server a history event and a visibility write (four per new
enrollment, about 3.5 ms of dev-server CPU per email: bench/RESULTS.md).

So an enrollment's start input carries `patch_baseline`: how many of `PATCHES` (in
order, append-only) the code that started it already had. `patched()` answers True for
those without a marker and asks `workflow.patched` for any later one. Runs started
before the baseline existed decode it as 0 and call `workflow.patched` exactly as they
always did, so every saved history replays unchanged. Workflow code only.
"""

from __future__ import annotations

from temporalio import workflow

#: Every patch of the enrollment workflow, oldest first. Append only: a run's baseline
#: counts from the start of this tuple. Append a patch only in the release after the one that
#: added its `patched()` call, once every worker has it: during a rolling deploy a worker
#: without the patch could run a new enrollment's first task on the older path, which a
#: baseline that includes the patch would then replay on the newer one. (From the release
#: after this one, every deployed worker refuses a baseline it does not know
#: (`refuse_newer_baseline`), so a new patch may then join this tuple in the release that adds it.)
PATCHES = (
    "deliver-heartbeat-retry",
    "send-gate-reschedule",
    "sender-paused-waits",
    "ooo-replans-send",
    "deliver-channel-queue",
    "send-step",
)
#: What a run started by this code gets: every patch above is part of it from the start.
BASELINE = len(PATCHES)
#: Patches this release added: every run still records their markers. Each moves to the end
#: of `PATCHES` in the next release (the rolling-deploy rule above).
PENDING = ("send-step-local",)


class NewerBaselineError(Exception):
    """A run started by newer code than this worker's: its workflow task fails and is retried.

    Not an `ApplicationError`, so the workflow task fails (the run does not): the server
    retries it, and a worker with the newer code takes it during the rolling deploy.
    """


def refuse_newer_baseline(baseline: int) -> None:
    """Fail this workflow task if the run counts more patches than this code knows."""
    if baseline > BASELINE:
        raise NewerBaselineError(
            f"this run was started with patch baseline {baseline}; this worker knows {BASELINE} "
            "patches: a worker with newer code must run it"
        )


def patched(patch_id: str) -> bool:
    """`workflow.patched`, answered without a marker for the patches this run was started with."""
    baseline = getattr(workflow.instance(), "patch_baseline", 0)
    if patch_id in PATCHES[:baseline]:
        return True
    return workflow.patched(patch_id)


__all__ = ["BASELINE", "PATCHES", "PENDING", "NewerBaselineError", "patched", "refuse_newer_baseline"]
