"""The one table of identity kinds agrees with every place that uses it."""

from __future__ import annotations

import pytest

from models.identity_kinds import FIELD_KIND, KIND_FIELD, IdentityKind, kinds_for_channel, stand_in_kind, target_kind
from models.sequence import Channel
from services import identities, segment_rules, templating


@pytest.mark.parametrize("channel", list(Channel))
def test_every_channel_has_a_target_kind_that_normalizes(channel: Channel) -> None:
    kind = target_kind(channel)
    assert kinds_for_channel(channel)[0] == kind
    with pytest.raises(ValueError):
        identities.normalize(kind, "")


def test_x_handle_stands_in_for_x_only() -> None:
    assert kinds_for_channel(Channel.X) == (IdentityKind.X, IdentityKind.X_HANDLE)
    assert stand_in_kind(Channel.EMAIL) is None
    assert kinds_for_channel("email") == (IdentityKind.EMAIL,)


def test_fields_and_kinds_are_one_to_one_and_shared() -> None:
    assert set(KIND_FIELD) == set(IdentityKind)
    assert {KIND_FIELD[k]: k for k in KIND_FIELD} == dict(FIELD_KIND)
    assert identities.COLUMN_CHANNEL is FIELD_KIND
    assert segment_rules.IDENTITY_FIELDS is FIELD_KIND
    assert set(FIELD_KIND) <= set(templating.KNOWN_FIELDS)
