"""The bytes of one outbound email: MIME body, compliance headers, DKIM signature.

Pure (no network, no database), so what a provider will read can be tested without a
server, and the SMTP transport (`activities/channels/email.py`) only moves bytes.

Why some headers are written by hand: Python's email policies RFC 2047-encode any
header word longer than a line (`List-Unsubscribe: =?utf-8?q?=3Chttps...?=`), and mail
providers do not decode encoded-words in List-Unsubscribe, so one-click unsubscribe
silently disappears for every real-world URL. The ASCII-only structured headers
(Message-ID, In-Reply-To, References, List-Unsubscribe, List-Unsubscribe-Post) are
therefore validated and serialized here, folded only between their items (RFC 2369,
RFC 8058, RFC 5322 section 2.2.3: each physical line at most 998 octets).

Why the MIME structure is written here too: building an `EmailMessage` and flattening
it cost 1.5 ms of CPU per typical email on the bench VM (timeit over process time;
py-spy saw ~4 ms under load): the email package parses every header it is given into
a header object (a new class per header from HeaderRegistry), re-parses Content-Type
at each `set_param`, folds them all again when generating, and compiles a regex per
boundary. Writing the same bytes directly takes 0.05 ms (0.3 ms with HTML, threading
and a non-ASCII name and subject). The output is byte for byte what `set_content`
and `add_alternative` with quoted-printable generate (the same encoder, the same
boundary style), minus the stray `MIME-Version` that `add_alternative` puts into the
HTML part. Headers that may need RFC 2047 encoded words, quoting or folding (From's
display name, Subject, To) still go through the email package's policy unless they
are plain printable ASCII that fits one line, which the policy would write unchanged;
From is cached per sender. tests/test_email_bytes.py holds the two side by side.

DKIM (RFC 6376) is computed with dkimpy over the final bytes, relaxed/relaxed, covering
From, To, Subject, Date, Message-ID, List-Unsubscribe and List-Unsubscribe-Post (plus
the MIME and threading headers present), with From, To, Subject and the unsubscribe
headers signed once more than they occur so that nobody can add a second one.
dkimpy's own RSA is Python's `pow` without CRT, the costliest part of a signed email,
so `_Signer` keeps dkimpy for the canonicalization, the header selection and the tag
list and replaces only the RSA step with `cryptography`'s PKCS#1 v1.5 (OpenSSL, CRT)
on a key loaded once per PEM: 7.9 -> 0.69 ms of CPU per signed typical email, 2048-bit
key (process time, bench VM; of the 0.69, OpenSSL's RSA is ~0.30 and dkimpy's own key
parse, which `DKIM.sign` still does, ~0.16). RSASSA-PKCS1-v1_5 is deterministic, so
the header is byte for byte what `dkim.sign` writes (tests/test_dkim_fast.py holds the
two side by side).
"""

from __future__ import annotations

import base64
import html as html_lib
import random
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email import quoprimime
from email.errors import HeaderParseError
from email.headerregistry import Address
from email.policy import SMTP as SMTP_POLICY
from email.utils import format_datetime
from functools import lru_cache
from urllib.parse import urlsplit

import dkim
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim import RE_BTAG, HashThrough, fold, hash_headers

from activities.channels.base import (
    DkimKey,
    OutboundMessage,
    PermanentChannelError,
    make_message_id,
)
from activities.channels.relay_tags import relay_headers

#: RFC 5322 section 2.1.1: a line is at most 998 characters without its CRLF.
MAX_LINE = 998
#: The longest unsubscribe URI that fits, with its brackets and a comma, on the header's first line.
MAX_UNSUBSCRIBE_URI = MAX_LINE - len("List-Unsubscribe: <>,")
#: Folding a header onto more lines is preferred past this length (RFC 5322 "SHOULD").
PREFERRED_LINE = 78

#: Characters allowed in a URI (RFC 3986), none of which needs encoding in a header.
_URI = re.compile(r"^[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+$")
#: An RFC 5322 msg-id: `<left@right>`, printable ASCII without brackets or spaces.
_MSG_ID = re.compile(r"^<[!-;=?-~]+@[!-;=?-~]+>$")

#: A header value the email package writes unchanged: printable ASCII words, one space apart,
#: nothing that could be read as an RFC 2047 encoded word.
_PLAIN_TEXT = re.compile(r"(?!.*=\?)[!-~]+(?: [!-~]+)*")
#: A dot-atom addr-spec the email package writes unchanged (no `=` or `?`, no quoting, a host name).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/^_`{|}~-]+"
_PLAIN_ADDRESS = re.compile(rf"({_ATEXT}(?:\.{_ATEXT})*)@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)")
#: The headers of the two body parts (`set_content(..., cte="quoted-printable")`), then the blank line.
_TEXT_PART_HEADERS = b'Content-Type: text/plain; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n'
_HTML_PART_HEADERS = b'Content-Type: text/html; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n'

#: Headers the DKIM signature covers when present, in this order.
DKIM_SIGNED = (
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "In-Reply-To",
    "References",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "MIME-Version",
    "Content-Type",
)
#: Signed one extra time: a second instance added in transit breaks the signature.
DKIM_OVERSIGNED = ("From", "To", "Subject", "List-Unsubscribe", "List-Unsubscribe-Post")


@dataclass(frozen=True)
class ComposedEmail:
    """A message ready for DATA: CRLF line endings, not dot-stuffed."""

    raw: bytes
    message_id: str


def text_to_html(text: str) -> str:
    """Plain text as simple HTML paragraphs (the HTML part of a text-only message)."""
    paragraphs = [p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
    return "\n".join("<p>" + html_lib.escape(p).replace("\n", "<br>\n") + "</p>" for p in paragraphs)


def html_to_text_fallback(html: str) -> str:
    """A rough plain-text rendering of an HTML body (used only when no text was given)."""
    text = re.sub(r"(?is)<(script|style).*?</\1>", "", html)
    text = re.sub(r"(?i)<br\s*/?>", "\n", text)
    text = re.sub(r"(?i)</p\s*>", "\n\n", text)
    text = re.sub(r"<[^>]+>", "", text)
    return html_lib.unescape(re.sub(r"\n{3,}", "\n\n", text)).strip()


def _invalid(message: str) -> PermanentChannelError:
    return PermanentChannelError(f"email: {message}", code="invalid_message")


def split_address(address: str, field: str) -> Address:
    """`address` as an Address, or a permanent error naming `field` (a bad `to` is a bounce)."""
    if address.count("@") != 1 or not all(address.split("@")):
        raise PermanentChannelError(
            f"email {field}: {address!r} is not an email address",
            code="invalid_address",
            bounce=field == "to",
        )
    plain = _PLAIN_ADDRESS.fullmatch(address)
    if plain:  # what the parser would find, without running it (it is slow)
        return Address(username=plain[1], domain=plain[2])
    try:
        return Address(addr_spec=address)
    except (ValueError, IndexError, HeaderParseError) as err:
        raise PermanentChannelError(
            f"email {field}: {address!r} is not a valid email address ({err})",
            code="invalid_address",
            bounce=field == "to",
        ) from err


def check_unsubscribe_url(url: str | None) -> str:
    """The https (or, in development, http) unsubscribe URL, checked to be writable unencoded."""
    parts = urlsplit(url or "")
    if not url or parts.scheme not in {"https", "http"} or not parts.netloc:
        raise _invalid(f"unsubscribe_url {url!r} must be an absolute https link")
    if not _URI.match(url):
        raise _invalid(f"unsubscribe_url {url[:80]!r} has characters a URI cannot carry (spaces, quotes, non-ASCII)")
    if len(url) > MAX_UNSUBSCRIBE_URI:
        raise _invalid(
            f"unsubscribe_url is {len(url)} characters; List-Unsubscribe allows at most {MAX_UNSUBSCRIBE_URI}"
        )
    return url


def check_unsubscribe_mailto(uri: str | None) -> str | None:
    """The optional `mailto:` URI beside the https one, checked like the URL."""
    if not uri:
        return None
    if not uri.startswith("mailto:") or "@" not in uri or not _URI.match(uri):
        raise _invalid(f"unsubscribe_mailto {uri[:80]!r} must be a mailto: URI with an address")
    if len(uri) > MAX_UNSUBSCRIBE_URI:
        raise _invalid(f"unsubscribe_mailto is {len(uri)} characters; at most {MAX_UNSUBSCRIBE_URI}")
    return uri


def check_message_id(value: str, field: str) -> str:
    """An RFC 5322 msg-id (`<left@right>`), or a permanent error naming `field`."""
    value = value.strip()
    if not _MSG_ID.match(value) or len(value) > MAX_LINE - len("In-Reply-To: "):
        raise _invalid(f"{field} {value[:80]!r} is not a message id like <id@domain>")
    return value


def fold_items(name: str, items: list[str], separator: str) -> bytes:
    """`Name: a<sep> b ...` folded only between items (never inside one), CRLF-terminated."""
    line = f"{name}: {items[0]}"
    lines: list[str] = []
    for item in items[1:]:
        if len(line) + len(separator) + 1 + len(item) <= PREFERRED_LINE:
            line = f"{line}{separator} {item}"
        else:
            lines.append(line + separator)
            line = f" {item}"
    lines.append(line)
    return "".join(f"{text}\r\n" for text in lines).encode("ascii")


def list_unsubscribe_headers(url: str, mailto: str | None = None) -> bytes:
    """RFC 2369 List-Unsubscribe (https first, then mailto) and RFC 8058 List-Unsubscribe-Post."""
    uris = [f"<{check_unsubscribe_url(url)}>"]
    checked = check_unsubscribe_mailto(mailto)
    if checked:
        uris.append(f"<{checked}>")
    return fold_items("List-Unsubscribe", uris, ",") + b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"


def policy_header(name: str, value: str | Address) -> bytes:
    """`Name: value` as the email package writes it: RFC 2047 encoded words, quoting, folding."""
    return SMTP_POLICY.fold_binary(*SMTP_POLICY.header_store_parse(name, value))


def _text_header(name: str, value: str) -> bytes:
    """An unstructured header (Subject): written directly when the email package would not change it."""
    line = f"{name}: {value}"
    if len(line) <= PREFERRED_LINE and _PLAIN_TEXT.fullmatch(value):
        return line.encode("ascii") + b"\r\n"
    return policy_header(name, value)


def _address_header(name: str, address: Address) -> bytes:
    """A header of one bare address (To): written directly when it is a plain dot-atom that fits."""
    line = f"{name}: {address.addr_spec}"
    if len(line) <= PREFERRED_LINE and _PLAIN_ADDRESS.fullmatch(address.addr_spec):
        return line.encode("ascii") + b"\r\n"
    return policy_header(name, address)


@lru_cache(maxsize=1024)
def _from_header(display_name: str, username: str, domain: str) -> bytes:
    """From, display name encoded by the email package; the same few senders send every email."""
    return policy_header("From", Address(display_name=display_name, username=username, domain=domain))


def qp_body(text: str) -> bytes:
    """`text` as UTF-8 quoted-printable with CRLF line ends, byte for byte what
    `EmailMessage.set_content(text, cte="quoted-printable")` generates (same encoder)."""
    lines = text.encode("utf-8").splitlines()
    encoded = quoprimime.body_encode((b"\n".join(lines) + b"\n").decode("latin-1"), PREFERRED_LINE)
    return encoded.replace("\n", "\r\n").encode("ascii")


def _boundary(*bodies: bytes) -> str:
    """A multipart boundary in the email package's style that occurs in none of `bodies`
    (quoted-printable never contains `==`, so the first one always fits)."""
    while True:
        boundary = f"==============={random.randrange(10**19):019d}=="
        if not any(boundary.encode("ascii") in body for body in bodies):
            return boundary


@lru_cache(maxsize=256)
def _rsa_key(pem: bytes) -> rsa.RSAPrivateKey:
    """The sender's RSA key loaded by `cryptography`, once per PEM (keys are decrypted per
    send, so the PEM bytes are the cache key)."""
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("not an RSA key")
    return key


class _Signer(dkim.DKIM):
    """dkimpy's `DKIM`, signing rsa-sha256 with `cryptography` instead of its pure-Python RSA.

    Only `gen_header` is overridden, and only the RSA step differs: the rest is dkimpy
    1.1.8's `DKIM.gen_header` (standardize=False, the path `DKIM.sign` takes), line for
    line. dkimpy has no hook for the signing primitive (`gen_header` calls the module's
    `RSASSA_PKCS1_v1_5_sign` on a key parsed by its own `parse_pem_private_key`); this
    override is scoped to our signing and changes nothing for other dkimpy users.
    Re-check it against `dkim/__init__.py` when upgrading dkimpy: tests/test_dkim_fast.py
    fails if the output ever differs from `dkim.sign`.
    """

    def __init__(self, message: bytes, key: rsa.RSAPrivateKey, *, linesep: bytes) -> None:
        super().__init__(message, signature_algorithm=b"rsa-sha256", linesep=linesep)
        self._key = key

    def gen_header(self, fields, include_headers, canon_policy, header_name, pk, standardize=False):
        if standardize or self.signature_algorithm != b"rsa-sha256":
            raise ValueError("_Signer signs rsa-sha256 without standardize only")
        header_value = b"; ".join(b"=".join(x) for x in fields)
        header_value = fold(header_value, namelen=len(header_name), linesep=b"\r\n")
        header_value = RE_BTAG.sub(b"\\1", header_value)
        header = (header_name, b" " + header_value)
        h = HashThrough(self.hasher(), self.debug_content)
        sig = dict(fields)
        headers = canon_policy.canonicalize_headers(self.headers)
        self.signed_headers = hash_headers(h, canon_policy, headers, include_headers, header, sig)
        sig2 = self._key.sign(h.digest(), padding.PKCS1v15(), Prehashed(hashes.SHA256()))
        idx = [i for i in range(len(fields)) if fields[i][0] == b"b"][0]
        fields[idx] = (b"b", base64.b64encode(sig2))
        header_value = b"; ".join(b"=".join(x) for x in fields) + self.linesep
        return fold(header_value, namelen=len(header_name), linesep=self.linesep)


def dkim_signature(raw: bytes, key: DkimKey) -> bytes:
    """The `DKIM-Signature:` header (CRLF-terminated) for `raw`, or a permanent error."""
    present = {match.lower() for match in re.findall(rb"(?m)^([A-Za-z0-9-]+):", raw.split(b"\r\n\r\n", 1)[0])}
    names = [h for h in DKIM_SIGNED if h.lower().encode() in present]
    names += [h for h in DKIM_OVERSIGNED if h.lower().encode() in present]
    try:
        pem = key.private_key.get_secret_value().encode("ascii")
        signature = _Signer(raw, _rsa_key(pem), linesep=b"\r\n").sign(
            key.selector.encode("ascii"),
            key.domain.encode("ascii"),
            pem,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=[n.lower().encode() for n in names],
        )
    except (dkim.DKIMException, ValueError, TypeError, UnicodeEncodeError) as err:
        raise PermanentChannelError(
            f"email: DKIM signing as {key.selector}._domainkey.{key.domain} failed: {type(err).__name__}",
            code="dkim",
        ) from None
    return signature if signature.endswith(b"\r\n") else signature + b"\r\n"


def compose_message(
    msg: OutboundMessage,
    *,
    default_footer: str | None = None,
    message_id_domain: str | None = None,
    now: datetime | None = None,
    relay_tags: tuple[str, ...] = (),
) -> ComposedEmail:
    """The bytes of the email for `msg` (raises `PermanentChannelError` if it is not sendable)."""
    if msg.channel != "email" or msg.action != "SEND_EMAIL":
        raise PermanentChannelError(
            f"email channel cannot perform {msg.channel}/{msg.action}",
            code="unsupported_action",
        )
    if not msg.subject:
        raise _invalid("the subject is empty")
    if not (msg.text or msg.html):
        raise _invalid("the body is empty")
    footer = msg.footer or default_footer
    if not footer:
        raise _invalid("no postal address footer (POSTAL_ADDRESS) for this message")
    url = check_unsubscribe_url(msg.unsubscribe_url)
    unsubscribe = list_unsubscribe_headers(url, msg.unsubscribe_mailto)
    sender = split_address(msg.sender, "sender")
    recipient = split_address(msg.to, "to")
    domain = message_id_domain or sender.domain
    # The delivery activity always gives the ledger's id; a message sent without one gets a random id.
    given = msg.message_id or make_message_id(msg.idempotency_key, domain, secret=None)
    message_id = check_message_id(given, "message_id")
    in_reply_to = check_message_id(msg.in_reply_to, "in_reply_to") if msg.in_reply_to else None
    references = [check_message_id(r, "references") for r in msg.references]
    if in_reply_to and in_reply_to not in references:
        references.append(in_reply_to)

    text = msg.text if msg.text is not None else html_to_text_fallback(msg.html or "")
    text_part = text.rstrip("\n") + f"\n\n--\n{footer}\nUnsubscribe: {url}\n"
    html_body = msg.html if msg.html is not None else text_to_html(text)
    html_footer = (
        '<hr style="border:none;border-top:1px solid #ddd">'
        '<p style="font-size:12px;color:#666">'
        f"{html_lib.escape(footer).replace(chr(10), '<br>')}<br>"
        f'<a href="{html_lib.escape(url, quote=True)}">Unsubscribe</a></p>'
    )
    if re.search(r"</body\s*>", html_body, re.IGNORECASE):
        html_part = re.sub(r"</body\s*>", lambda _m: html_footer + "</body>", html_body, count=1, flags=re.I)
    else:
        html_part = (
            f'<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>{html_body}{html_footer}</body></html>'
        )

    text_qp, html_qp = qp_body(text_part), qp_body(html_part)
    boundary = _boundary(text_qp, html_qp)
    head = (
        _from_header(msg.sender_name or "", sender.username, sender.domain)
        + _address_header("To", recipient)
        + _text_header("Subject", msg.subject)
        + f"Date: {format_datetime(now or datetime.now(UTC))}\r\n".encode("ascii")
        + b"MIME-Version: 1.0\r\n"
        + f'Content-Type: multipart/alternative;\r\n boundary="{boundary}"\r\n'.encode("ascii")
    )
    delimiter = f"--{boundary}\r\n".encode("ascii")
    body = b"".join(
        [delimiter, _TEXT_PART_HEADERS, text_qp, b"\r\n", delimiter, _HTML_PART_HEADERS, html_qp]
    ) + f"\r\n--{boundary}--\r\n".encode("ascii")

    structured = f"Message-ID: {message_id}\r\n".encode("ascii")
    if in_reply_to:
        structured += f"In-Reply-To: {in_reply_to}\r\n".encode("ascii")
    if references:
        structured += fold_items("References", references, "")
    structured += relay_headers(relay_tags, msg.idempotency_key)  # ESP custom data (h7: relay_tags.py)
    raw = head + structured + unsubscribe + b"\r\n" + body
    if msg.dkim is not None:
        raw = dkim_signature(raw, msg.dkim) + raw
    return ComposedEmail(raw=raw, message_id=message_id)
