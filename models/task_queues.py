"""Task queue names: the workflows' queue, and one activity queue per outbound channel.

Why per channel: a worker's activity slots are shared by everything on its queue, so a
slow or hanging provider (the X API, a LinkedIn/XMTP relay) would fill them with stuck
sends and hold back the email of every other lead. Those channels' sends go to their own
queue (`sequencer` -> `sequencer-x`, ...), served by their own worker with its own
concurrency limit.

Email sends run beside their workflows (`BESIDE_WORKFLOWS`): a send that is due runs as a
local activity inside the workflow task that asks for it, and otherwise as an activity on
the workflows' own queue (handed back with the workflow task's completion: eager activity
execution). Either way the server skips the matching round trip and its writes
(bench/RESULTS.md). A slow X or relay provider still cannot hold email back; a slow SMTP
server holds the workflows worker's local activity and activity slots, where the other work
is short or already running. `sequencer-email` is still served for sends scheduled there before.
Pure: the workflow derives the names from its own task queue.
"""

from __future__ import annotations

from models.sequence import Channel

#: Channels whose sends run beside their workflow: a local activity when due, else on the workflows' queue.
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
