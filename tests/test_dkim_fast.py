"""DKIM signing with `cryptography`'s RSA: the same header `dkim.sign` writes, byte for byte.

Why: email_compose signs through a narrow override of dkimpy's `gen_header` (dkimpy's
own RSA is pure-Python `pow`, ~9 ms per signature). RSASSA-PKCS1-v1_5 is deterministic,
so for the same message, key, selector and time the two signatures must be identical;
if a dkimpy upgrade changes what `gen_header` does, this fails before receivers do.
"""

from __future__ import annotations

import time
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import SecretStr

from activities.channels.base import DkimKey
from activities.channels.email_compose import compose_message, dkim_signature
from services.sender_dkim import dns_txt
from tests.test_dkim import _msg, dns_answering, signed_headers


@pytest.mark.parametrize("fmt", [serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL])
def test_the_fast_signature_is_dkimpys_byte_for_byte_and_verifies(fmt: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    pem = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
        .decode()
    )
    key = DkimKey(selector="s1", domain="acme.test", private_key=SecretStr(pem))
    raw = compose_message(_msg(pem, dkim=None)).raw
    monkeypatch.setattr(time, "time", lambda: 1_764_550_000.25)

    ours = dkim_signature(raw, key)
    names = signed_headers(ours + raw)
    theirs = dkim.sign(
        raw,
        b"s1",
        b"acme.test",
        pem.encode("ascii"),
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[n.encode() for n in names],
        linesep=b"\r\n",
    )
    assert b"t=1764550000;" in ours
    assert ours == theirs
    assert ours == dkim_signature(raw, key)  # the cached key signs the same again

    dns = dns_answering({"s1._domainkey.acme.test": dns_txt(pem)[0]})
    assert dkim.verify(ours + raw, dnsfunc=dns)
    assert not dkim.verify(ours + raw.replace(b"Hi Bob", b"Hi Rob"), dnsfunc=dns)


def test_a_key_that_is_not_rsa_is_a_permanent_dkim_error() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    from activities.channels.base import PermanentChannelError

    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        .decode()
    )
    raw = compose_message(_msg(pem, dkim=None)).raw
    with pytest.raises(PermanentChannelError) as err:
        dkim_signature(raw, DkimKey(selector="s1", domain="acme.test", private_key=SecretStr(pem)))
    assert err.value.code == "dkim"
