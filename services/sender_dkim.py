"""DKIM keys of email sender accounts: checked, stored encrypted, and the DNS record to publish.

Why Sequencer signs at all: many relays (a plain SMTP server, a mailbox provider for a
custom domain) do not sign, and since 2024 Gmail and Yahoo want bulk mail DKIM-aligned
with the From domain. A key is checked before it is stored (RSA, at least 1024 bits,
readable by dkimpy, which signs), so a bad key fails at `senders dkim`, not at the
first send. The private key is stored as a SECRETS_KEY token (services/secret_box.py)
and only the delivery activity decrypts it, right before a send; it is never printed.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass

import dkim.crypto
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from db.session import SessionFactory
from db.tables import SenderAccount
from services.secret_box import SecretBox, SecretKeyError

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_SELECTOR = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
_DOMAIN = re.compile(rf"^{_LABEL}(?:\.{_LABEL})+$")
#: dkimpy's verifiers refuse shorter keys by default; 2048 is what providers recommend.
MIN_BITS = 1024


class DkimConfigError(ValueError):
    """A DKIM key, selector or domain that cannot be used; the message names which."""


@dataclass(frozen=True)
class DkimRecord:
    """What to publish in DNS for a sender's DKIM key (no secret in here)."""

    sender_id: int
    selector: str
    domain: str
    bits: int
    #: The public key as a TXT value: `v=DKIM1; k=rsa; p=<base64 SubjectPublicKeyInfo>`.
    txt: str
    #: Whether the From domain is `domain` or a subdomain of it (DMARC relaxed alignment).
    aligned: bool

    @property
    def name(self) -> str:
        """The TXT record's name."""
        return f"{self.selector}._domainkey.{self.domain}"


def what(sender_id: int) -> str:
    """How the key is named in SECRETS_KEY errors."""
    return f"sender {sender_id} DKIM key"


def dns_txt(private_key_pem: str) -> tuple[str, int]:
    """The TXT value that publishes the public half of `private_key_pem`, and its size in bits."""
    try:
        key = serialization.load_pem_private_key(private_key_pem.encode("ascii"), password=None)
    except (ValueError, TypeError, UnicodeEncodeError) as err:
        raise DkimConfigError(
            "--key-file: not an unencrypted PEM private key (make one with `openssl genrsa -out dkim.pem 2048`)"
        ) from err
    if not isinstance(key, rsa.RSAPrivateKey):
        raise DkimConfigError(f"--key-file: a {type(key).__name__.removeprefix('_')} key; DKIM signing here needs RSA")
    if key.key_size < MIN_BITS:
        raise DkimConfigError(f"--key-file: an RSA key of {key.key_size} bits; use at least 2048 ({MIN_BITS} minimum)")
    try:
        dkim.crypto.parse_pem_private_key(private_key_pem.encode("ascii"))
    except dkim.crypto.UnparsableKeyError as err:  # pragma: no cover - cryptography read it, dkimpy should too
        raise DkimConfigError(f"--key-file: dkimpy cannot read this key ({err})") from err
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"v=DKIM1; k=rsa; p={base64.b64encode(spki).decode('ascii')}", key.key_size


def check_selector(selector: str) -> str:
    """A selector is one or more DNS labels (RFC 6376 section 3.1)."""
    selector = selector.strip()
    if not _SELECTOR.match(selector) or len(selector) > 63:
        raise DkimConfigError(f"--selector: {selector!r} is not a DNS label like s1 or mail2026")
    return selector


def check_domain(domain: str) -> str:
    """A signing domain: a host name with at least two labels."""
    domain = domain.strip().lower().rstrip(".")
    if not _DOMAIN.match(domain) or len(domain) > 253:
        raise DkimConfigError(f"--domain: {domain!r} is not a domain name like example.com")
    return domain


def _record(sender: SenderAccount, selector: str, domain: str, txt: str, bits: int) -> DkimRecord:
    from_domain = sender.address.rsplit("@", 1)[-1].lower()
    aligned = from_domain == domain or from_domain.endswith("." + domain)
    return DkimRecord(sender.id, selector, domain, bits, txt, aligned)


async def _email_sender(session: AsyncSession, sender_id: int) -> SenderAccount:
    sender = (
        await session.execute(select(SenderAccount).where(SenderAccount.id == sender_id).with_for_update())
    ).scalar_one_or_none()
    if sender is None:
        raise LookupError(f"sender {sender_id} does not exist (see `senders list`)")
    if sender.channel != "email":
        raise DkimConfigError(f"sender {sender_id} is a {sender.channel} sender; DKIM applies to email senders")
    return sender


async def set_sender_dkim(
    session_factory: SessionFactory,
    box: SecretBox,
    sender_id: int,
    *,
    selector: str,
    private_key_pem: str,
    domain: str | None = None,
) -> DkimRecord:
    """Check and store a sender's DKIM key (encrypted); return the DNS record to publish."""
    selector = check_selector(selector)
    txt, bits = dns_txt(private_key_pem)
    async with session_factory() as session, session.begin():
        sender = await _email_sender(session, sender_id)
        signing_domain = check_domain(domain or sender.address.rsplit("@", 1)[-1])
        try:
            token = box.encrypt(private_key_pem, what=what(sender_id))
        except SecretKeyError as err:
            raise DkimConfigError(str(err)) from None
        sender.dkim_selector = selector
        sender.dkim_domain = signing_domain
        sender.dkim_private_key = token
        return _record(sender, selector, signing_domain, txt, bits)


async def clear_sender_dkim(session_factory: SessionFactory, sender_id: int) -> None:
    """Stop signing for this sender (its relay signs, or the key is being replaced)."""
    async with session_factory() as session, session.begin():
        sender = await _email_sender(session, sender_id)
        sender.dkim_selector = sender.dkim_domain = sender.dkim_private_key = None


async def sender_dkim_record(session_factory: SessionFactory, box: SecretBox, sender_id: int) -> DkimRecord | None:
    """The DNS record of the sender's stored key (None: Sequencer does not sign for it)."""
    async with session_factory() as session, session.begin():
        sender = await _email_sender(session, sender_id)
        if not (sender.dkim_selector and sender.dkim_private_key):
            return None
        try:
            pem = box.decrypt(sender.dkim_private_key, what=what(sender_id))
        except SecretKeyError as err:
            raise DkimConfigError(str(err)) from None
        txt, bits = dns_txt(pem)
        domain = sender.dkim_domain or sender.address.rsplit("@", 1)[-1]
        return _record(sender, sender.dkim_selector, domain, txt, bits)
