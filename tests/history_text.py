"""What a workflow history holds, as bytes to search (payload data is base64 in JSON).

`payloads(history)` walks every event for the `Payload` messages that go through the
data converter (not search attributes, not the SDK's patch markers); `history_bytes`
joins their raw data with the history's serialized form, so a test can assert that a
text is nowhere in what the server stores.
"""

from __future__ import annotations

import json
from typing import Any

from temporalio.api.common.v1 import Payload
from temporalio.client import WorkflowHistory

#: Not payloads the codec sees: search attributes (indexed by the server; ids and step
#: names only) and the SDK's own patch markers (`workflow.patched` ids).
SKIPPED = ("search_attributes", "upsert_search_attributes", "marker_recorded_event_attributes")


def payloads(history: WorkflowHistory, *, everything: bool = False) -> list[Payload]:
    """Every Payload in the history's events that goes through the codec (all: `everything`)."""
    found: list[Payload] = []

    def walk(msg: Any) -> None:
        if isinstance(msg, Payload):
            found.append(msg)
            return
        for field, value in msg.ListFields():
            if field.message_type is None or (field.name in SKIPPED and not everything):
                continue
            if hasattr(value, "ListFields"):
                walk(value)
            else:  # repeated fields and maps
                for item in list(value.values()) if hasattr(value, "values") else list(value):
                    if hasattr(item, "ListFields"):
                        walk(item)

    for event in history.events:
        walk(event)
    return found


def history_bytes(history: WorkflowHistory) -> bytes:
    """The raw bytes of every payload plus the serialized events: search them for plaintext."""
    parts = [p.data for p in payloads(history, everything=True)]
    parts += [event.SerializeToString() for event in history.events]
    return b"\n".join(parts)


def local_activities(history: WorkflowHistory) -> list[str]:
    """The activity types of the local activities the run recorded (one marker each), in order."""
    names = []
    for e in history.events:
        if e.HasField("marker_recorded_event_attributes"):
            marker = e.marker_recorded_event_attributes
            if marker.marker_name == "core_local_activity":
                names.append(json.loads(marker.details["data"].payloads[0].data)["activity_type"])
    return names
