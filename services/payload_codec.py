"""Optional encryption of every Temporal payload (AES-256-GCM), keyed from settings.

With `TEMPORAL_PAYLOAD_KEY` set, workflow inputs, results, signals, queries, activity
arguments and failure details leave the process encrypted: the Temporal server (a
self-hosted cluster's database, Temporal Cloud) stores only ciphertext. Each payload
names the key that encrypted it (a short fingerprint, never the key), so keys rotate:
list the new key first, keep the old ones while histories written with them are alive.

Search attributes are not payloads the codec sees: they hold only ids and step names.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadCodec

ENCODING = b"binary/encrypted"
NONCE_BYTES = 12


class PayloadKeyError(ValueError):
    """A payload encrypted with a key this process does not have, or tampered with."""


def key_id(key: bytes) -> str:
    """The fingerprint stored beside each payload (identifies the key, reveals nothing of it)."""
    return hashlib.sha256(b"sequencer payload key:" + key).hexdigest()[:16]


class AesGcmPayloadCodec(PayloadCodec):
    """Encrypts with the first key; decrypts with whichever key a payload names."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ValueError("AesGcmPayloadCodec needs at least one key")
        self._encrypt_id = key_id(keys[0])
        self._keys = {key_id(k): AESGCM(k) for k in keys}

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Each payload, serialized whole (metadata too) and encrypted."""
        aead = self._keys[self._encrypt_id]
        out = []
        for payload in payloads:
            nonce = os.urandom(NONCE_BYTES)
            out.append(
                Payload(
                    metadata={"encoding": ENCODING, "encryption-key-id": self._encrypt_id.encode()},
                    data=nonce + aead.encrypt(nonce, payload.SerializeToString(), None),
                )
            )
        return out

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Encrypted payloads decrypted; others (written before the codec was on) as they are."""
        out = []
        for payload in payloads:
            if payload.metadata.get("encoding") != ENCODING:
                out.append(payload)
                continue
            kid = payload.metadata.get("encryption-key-id", b"").decode(errors="replace")
            aead = self._keys.get(kid)
            if aead is None:
                raise PayloadKeyError(
                    f"payload encrypted with key {kid!r}, which is not in TEMPORAL_PAYLOAD_KEY "
                    "(add the previous key after the current one)"
                )
            try:
                plain = aead.decrypt(payload.data[:NONCE_BYTES], payload.data[NONCE_BYTES:], None)
            except InvalidTag as err:
                raise PayloadKeyError(f"payload encrypted with key {kid!r} does not decrypt (altered?)") from err
            inner = Payload()
            inner.ParseFromString(plain)
            out.append(inner)
        return out
