"""Fixtures for the local HTTP stand-ins: the fake X API and the fake relay (devstack/fake_*.py).

Registered for every test module by `pytest_plugins` in tests/conftest.py: a test asks for
`x_server` or `relay_server` by name, nothing to import. The stand-ins themselves live in
devstack/ because `make run` serves the same ones.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devstack.fake_http import FakeService, RecordedRequest, run_app
from devstack.fake_relay import RELAY_SIGNING_KEY, RELAY_TOKEN, FakeRelay
from devstack.fake_x import X_TOKEN, FakeX

__all__ = [
    "RELAY_SIGNING_KEY",
    "RELAY_TOKEN",
    "X_TOKEN",
    "FakeRelay",
    "FakeService",
    "FakeX",
    "RecordedRequest",
    "relay_server",
    "run_app",
    "x_server",
]


@pytest.fixture
def x_server() -> Iterator[FakeX]:
    """A running fake X API (token `X_TOKEN`)."""
    fake = FakeX()
    with fake.running():
        yield fake


@pytest.fixture
def relay_server() -> Iterator[FakeRelay]:
    """A running fake relay (token `RELAY_TOKEN`)."""
    fake = FakeRelay()
    with fake.running():
        yield fake
