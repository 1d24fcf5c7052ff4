"""Task queue names: the workflows' queue, and one activity queue per outbound channel.

Why per channel: a worker's activity slots are shared by everything on its queue, so a
slow or hanging provider (the X API, a LinkedIn/XMTP relay) would fill them with stuck
sends and hold back the email of every other lead. Those channels' sends go to their own
queue (`sequencer` -> `sequencer-x`, ...), served by their own worker with its own
concurrency limit.

Email sends run on the workflows' own queue (`BESIDE_WORKFLOWS`): an activity on the
workflow's queue is handed back with the workflow task's completion (eager activity
execution), so the server skips the matching round trip and its writes; on the dev server
that was ~4 ms of its CPU and ~3 ms of the worker's per email (bench/RESULTS.md). A slow
X or relay provider still cannot hold email back; a slow SMTP server fills the workflows
queue's slots, where the other activities are short or already running (bookkeeping runs as
local activities). `sequencer-email` is still served for sends scheduled there before.
Pure: the workflow derives the names from its own task queue.
"""

from __future__ import annotations

from models.sequence import Channel

#: Channels whose sends run on the workflows' queue, beside their workflow (eager dispatch).
BESIDE_WORKFLOWS: frozenset[Channel] = frozenset({Channel.EMAIL})

#: The role of the worker on the base queue: workflows and bookkeeping activities.
WORKFLOWS_ROLE = "workflows"
#: Every role a worker process can run: the base queue and each channel's queue.
ALL_ROLES: tuple[str, ...] = (WORKFLOWS_ROLE, *(c.value for c in Channel))


def channel_queue(base: str, channel: Channel | str) -> str:
    """The activity task queue of `channel`'s sends, next to the base queue `base`."""
    return f"{base}-{Channel(channel).value}"


def role_queue(base: str, role: str) -> str:
    """The task queue a worker of `role` polls (`workflows`: the base queue itself)."""
    return base if role == WORKFLOWS_ROLE else channel_queue(base, role)


def parse_roles(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Roles from `workflows,email` (or a list), in `ALL_ROLES` order; `all` means every one.

    Raises ValueError naming an unknown role and the known ones.
    """
    parts = text.replace("\n", ",").split(",") if isinstance(text, str) else list(text)
    wanted = {p.strip().lower() for p in parts if p.strip()}
    if not wanted:
        raise ValueError(f"no worker queue named: use any of {', '.join(ALL_ROLES)} (or all)")
    if "all" in wanted:
        return ALL_ROLES
    unknown = sorted(wanted - set(ALL_ROLES))
    if unknown:
        raise ValueError(f"unknown worker queue {unknown[0]!r}: use any of {', '.join(ALL_ROLES)} (or all)")
    return tuple(r for r in ALL_ROLES if r in wanted)
