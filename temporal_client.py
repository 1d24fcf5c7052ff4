"""The one place that builds a Temporal `Client`.

Every process (worker, webhook app, CLI, benchmarks, tests) connects through
`connect()`, so all of them agree on the pydantic data converter that carries the
models in `models/` across the Temporal boundary.
"""

from __future__ import annotations

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from settings import Settings, get_settings


async def connect(settings: Settings | None = None, *, address: str | None = None) -> Client:
    """Connect to Temporal with the pydantic data converter."""
    settings = settings or get_settings()
    return await Client.connect(
        address or settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=pydantic_data_converter,
    )
