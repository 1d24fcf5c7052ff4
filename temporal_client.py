"""The one place that builds a Temporal `Client`.

Every process (worker, webhook app, CLI, benchmarks, tests) connects through
`connect()`, so all of them agree on the data converter (pydantic models, plus the
payload encryption codec when `TEMPORAL_PAYLOAD_KEY` is set) and on how to reach the
cluster: plain TCP for the dev server, TLS with an optional client certificate (mTLS),
or an API key (Temporal Cloud; implies TLS).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter, DefaultFailureConverterWithEncodedAttributes
from temporalio.service import TLSConfig

from services.payload_codec import AesGcmPayloadCodec
from settings import Settings, get_settings


def data_converter(settings: Settings) -> DataConverter:
    """The pydantic converter, encrypting payloads and failure texts when a key is set."""
    keys = settings.payload_keys()
    if not keys:
        return pydantic_data_converter
    return dataclasses.replace(
        pydantic_data_converter,
        payload_codec=AesGcmPayloadCodec(keys),
        # failure messages and stack traces go through the codec too
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )


def _read(variable: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"{variable}: cannot read {path!r} ({err.strerror or err})") from None


def tls_config(settings: Settings) -> TLSConfig | bool:
    """TLS settings for the frontend connection (False: plain TCP)."""
    cert, key = settings.temporal_tls_cert_file, settings.temporal_tls_key_file
    if bool(cert) != bool(key):
        raise ValueError("TEMPORAL_TLS_CERT_FILE and TEMPORAL_TLS_KEY_FILE go together (mTLS needs both)")
    wanted = (
        settings.temporal_tls
        or bool(cert)
        or bool(settings.temporal_tls_ca_file)
        or bool(settings.temporal_api_key.get_secret_value())
    )
    if not wanted:
        return False
    return TLSConfig(
        server_root_ca_cert=_read("TEMPORAL_TLS_CA_FILE", settings.temporal_tls_ca_file)
        if settings.temporal_tls_ca_file
        else None,
        client_cert=_read("TEMPORAL_TLS_CERT_FILE", cert) if cert else None,
        client_private_key=_read("TEMPORAL_TLS_KEY_FILE", key) if key else None,
        domain=settings.temporal_tls_server_name or None,
    )


async def connect(settings: Settings | None = None, *, address: str | None = None) -> Client:
    """Connect to Temporal with the shared data converter, TLS and API key from settings."""
    settings = settings or get_settings()
    return await Client.connect(
        address or settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=data_converter(settings),
        tls=tls_config(settings),
        api_key=settings.temporal_api_key.get_secret_value() or None,
    )
