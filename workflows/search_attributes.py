"""Typed search attributes that keep in-flight leads filterable in the Temporal Web UI.

The dev stack (`make run`) and the test fixtures register exactly these.
"""

from __future__ import annotations

from typing import Any

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.client import Client
from temporalio.common import SearchAttributeKey
from temporalio.service import RPCError, RPCStatusCode

SEQUENCE_NAME = SearchAttributeKey.for_keyword("SequenceName")
SEQUENCE_VERSION = SearchAttributeKey.for_int("SequenceVersion")
CURRENT_STEP = SearchAttributeKey.for_keyword("CurrentStep")
ENROLLMENT_STATUS = SearchAttributeKey.for_keyword("EnrollmentStatus")
NEXT_ACTION_AT = SearchAttributeKey.for_datetime("NextActionAt")
PERSON_ID = SearchAttributeKey.for_keyword("PersonId")
#: The mailbox watchers' state (watching, login_failed, stopped) for the Web UI.
MAILBOX_STATUS = SearchAttributeKey.for_keyword("MailboxStatus")

ALL_SEARCH_ATTRIBUTES: list[SearchAttributeKey[Any]] = [
    SEQUENCE_NAME,
    SEQUENCE_VERSION,
    CURRENT_STEP,
    ENROLLMENT_STATUS,
    NEXT_ACTION_AT,
    PERSON_ID,
    MAILBOX_STATUS,
]

#: `temporal server start-dev --search-attribute NAME=TYPE` spellings.
DEV_SERVER_FLAGS = [
    f"{key.name}={key.indexed_value_type.name.title().replace('_', '')}" for key in ALL_SEARCH_ATTRIBUTES
]


async def register_search_attributes(client: Client, namespace: str = "default") -> None:
    """Register the attributes on a server that lacks them (idempotent)."""
    try:
        existing = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=namespace)
        )
        known = set(existing.custom_attributes)
    except RPCError as err:  # the time-skipping test server has no list call
        if err.status != RPCStatusCode.UNIMPLEMENTED:
            raise
        known = set()
    missing = {
        key.name: IndexedValueType.ValueType(int(key.indexed_value_type))
        for key in ALL_SEARCH_ATTRIBUTES
        if key.name not in known
    }
    if missing:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(namespace=namespace, search_attributes=missing)
        )
