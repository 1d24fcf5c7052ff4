"""Payload encryption end to end, and the Temporal connection settings (issue 12 item 5).

With `TEMPORAL_PAYLOAD_KEY` set, the production worker runs an enrollment, the inbound
processor signals a reply, and the history fetched raw (as the server stores it) shows
no plaintext; the codec decrypts it back, rotates keys, and refuses foreign ones.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from temporalio.api.common.v1 import Payload
from temporalio.service import TLSConfig
from temporalio.testing import WorkflowEnvironment

from db.session import SessionFactory
from models.enrollment import EnrollmentStatus
from services.classify import get_classifier
from services.inbound_pipeline import InboundPipeline
from services.payload_codec import AesGcmPayloadCodec, PayloadKeyError
from settings import Settings
from temporal_client import connect, data_converter, tls_config
from tests.engine_harness import (
    Wired,
    all_senders,
    make_person,
    start_enrollment,
    store_version,
    wait_for_status,
)
from tests.history_text import history_bytes, payloads
from webhooks.payload import InboundPayload


def _key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


async def test_with_the_codec_on_a_raw_history_shows_no_plaintext(
    temporal_env: WorkflowEnvironment,
    session_factory: SessionFactory,
    task_queue: str,
    smtp_server: Any,
    wired: Wired,
) -> None:
    key = _key()
    settings = Settings(
        temporal_address=temporal_env.client.service_client.config.target_host,
        temporal_payload_key=SecretStr(key),
    )
    client = await connect(settings)  # what the worker, the app and the CLI use
    await all_senders(session_factory)
    pid = await make_person(session_factory, email="cipher@lead.test", first_name="Zebediah")
    ref, defn = await store_version(
        session_factory,
        {
            "name": "codec-seq",
            "steps": [
                {
                    "id": "m0",
                    "action": "SEND_EMAIL",
                    "subject": "Plaintext-Subject-Marker",
                    "body": "Plaintext-Body-Marker",
                    "edges": [
                        {"trigger": "REPLIED", "to": "done"},
                        {"trigger": "NOT_REPLIED", "after": "2d", "to": "done"},
                    ],
                },
                {"id": "done", "action": "WAIT", "edges": [{"trigger": "END"}]},
            ],
        },
    )
    async with wired(client=client):
        handle = await start_enrollment(client, task_queue, session_factory, ref, defn, pid)
        await wait_for_status(handle, lambda v: v.current_step == "m0" and v.phase == "waiting")
        processor = InboundPipeline(session_factory, client, get_classifier())
        reply = InboundPayload.model_validate(
            {"event_id": "codec-1", "type": "reply", "from": "cipher@lead.test", "text": "Yes, interested"}
        )
        assert (await processor.process(reply.to_event("email"))).status == "signalled"
        result = await handle.result()
    assert result.status == EnrollmentStatus.COMPLETED
    assert [p.step for p in result.path] == ["m0", "done"]
    assert len(smtp_server.messages) == 1

    # As the server stores it: fetched by a client without the codec, nothing decoded.
    history = await temporal_env.client.get_workflow_handle(handle.id).fetch_history()
    raw = history_bytes(history)
    for plain in (b"Plaintext-Body-Marker", b"Plaintext-Subject-Marker", b"positive", b"cipher@lead.test", b"Zebediah"):
        assert plain not in raw, plain
    sealed = payloads(history)
    assert sealed and all(p.metadata["encoding"] == b"binary/encrypted" for p in sealed)
    # ...and the markers really were in those payloads: the codec decrypts them back.
    decoded = await AesGcmPayloadCodec([base64.urlsafe_b64decode(key)]).decode(sealed)
    joined = b"".join(p.data for p in decoded)
    assert b"Plaintext-Body-Marker" in joined and b"positive" in joined


async def test_keys_rotate_and_a_foreign_key_is_refused() -> None:
    old, new = os.urandom(32), os.urandom(32)
    payload = Payload(metadata={"encoding": b"json/plain"}, data=b'{"text":"hello"}')
    [sealed] = await AesGcmPayloadCodec([old]).encode([payload])
    assert b"hello" not in sealed.SerializeToString()
    [opened] = await AesGcmPayloadCodec([new, old]).decode([sealed])  # rotated: old still decrypts
    assert opened == payload
    [resealed] = await AesGcmPayloadCodec([new, old]).encode([payload])
    with pytest.raises(PayloadKeyError, match="not in TEMPORAL_PAYLOAD_KEY"):
        await AesGcmPayloadCodec([old]).decode([resealed])
    tampered = Payload()
    tampered.CopyFrom(sealed)
    tampered.data = sealed.data[:-1] + bytes([sealed.data[-1] ^ 1])
    with pytest.raises(PayloadKeyError, match="does not decrypt"):
        await AesGcmPayloadCodec([old]).decode([tampered])
    # payloads written before the codec was switched on still read
    assert await AesGcmPayloadCodec([new]).decode([payload]) == [payload]


def test_settings_choose_plain_tls_mtls_or_api_key(tmp_path: Path) -> None:
    assert tls_config(Settings()) is False
    assert data_converter(Settings()).payload_codec is None
    assert isinstance(
        data_converter(Settings(temporal_payload_key=SecretStr(_key()))).payload_codec, AesGcmPayloadCodec
    )
    api = tls_config(Settings(temporal_api_key=SecretStr("cloud-key")))
    assert isinstance(api, TLSConfig) and api.client_cert is None  # an API key implies TLS
    (tmp_path / "ca.pem").write_bytes(b"CA")
    (tmp_path / "c.pem").write_bytes(b"CERT")
    (tmp_path / "k.pem").write_bytes(b"KEY")
    mtls = tls_config(
        Settings(
            temporal_tls_ca_file=str(tmp_path / "ca.pem"),
            temporal_tls_cert_file=str(tmp_path / "c.pem"),
            temporal_tls_key_file=str(tmp_path / "k.pem"),
            temporal_tls_server_name="ns.acct.tmprl.cloud",
        )
    )
    assert isinstance(mtls, TLSConfig)
    assert (mtls.server_root_ca_cert, mtls.client_cert, mtls.client_private_key, mtls.domain) == (
        b"CA",
        b"CERT",
        b"KEY",
        "ns.acct.tmprl.cloud",
    )
    with pytest.raises(ValueError, match="TEMPORAL_TLS_CERT_FILE and TEMPORAL_TLS_KEY_FILE go together"):
        tls_config(Settings(temporal_tls_cert_file=str(tmp_path / "c.pem")))
    with pytest.raises(ValueError, match="TEMPORAL_TLS_CA_FILE: cannot read"):
        tls_config(Settings(temporal_tls_ca_file=str(tmp_path / "missing.pem")))


# ------------------------------------------------------------------ TLS and mTLS, for real


def _pem_pair(name: str, issuer: tuple[Any, Any] | None, *, ca: bool = False, server: bool = False) -> tuple[Any, Any]:
    """A key and certificate (signed by `issuer`, else self-signed), from `cryptography`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[1].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    cert = builder.sign(issuer[0] if issuer else key, hashes.SHA256())
    return key, cert


def _write(path: Path, key: Any, cert: Any) -> tuple[str, str]:
    from cryptography.hazmat.primitives import serialization

    key_file, cert_file = path.with_suffix(".key"), path.with_suffix(".pem")
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(cert_file), str(key_file)


@asynccontextmanager
async def _mtls_front(target: str, ca_file: str, cert_file: str, key_file: str) -> AsyncIterator[int]:
    """A TLS front for the Temporal test server that requires a client certificate from our CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_file, key_file)
    ctx.load_verify_locations(ca_file)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["h2"])
    host, port = target.rsplit(":", 1)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def test_mtls_to_a_tls_frontend(temporal_env: WorkflowEnvironment, tmp_path: Path) -> None:
    ca_key, ca_cert = _pem_pair("Sequencer test CA", None, ca=True)
    ca_file, _ = _write(tmp_path / "ca", ca_key, ca_cert)
    server_cert, server_key = _write(tmp_path / "server", *_pem_pair("localhost", (ca_key, ca_cert), server=True))
    client_cert, client_key = _write(tmp_path / "client", *_pem_pair("sequencer-worker", (ca_key, ca_cert)))
    stranger_key, stranger_cert = _pem_pair("stranger", None)
    other_cert, other_key = _write(tmp_path / "stranger", stranger_key, stranger_cert)
    target = temporal_env.client.service_client.config.target_host
    async with _mtls_front(target, ca_file, server_cert, server_key) as port:
        base: dict[str, Any] = {"temporal_address": f"127.0.0.1:{port}", "temporal_tls_server_name": "localhost"}
        client = await connect(
            Settings(
                **base,
                temporal_tls_ca_file=ca_file,
                temporal_tls_cert_file=client_cert,
                temporal_tls_key_file=client_key,
            )
        )
        assert await client.service_client.check_health()  # a real RPC, over TLS, authenticated
        for refused in (
            {"temporal_tls_ca_file": ca_file},  # no client certificate
            {"temporal_tls_ca_file": ca_file, "temporal_tls_cert_file": other_cert, "temporal_tls_key_file": other_key},
            {"temporal_tls": True},  # the system roots do not know our CA
        ):
            with pytest.raises(Exception):  # noqa: B017 - the SDK raises RuntimeError or RPCError by phase
                plain = await asyncio.wait_for(connect(Settings(**base, **refused)), timeout=30)
                await plain.service_client.check_health()
