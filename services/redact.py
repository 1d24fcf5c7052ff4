"""Take personal data out of texts that leave PostgreSQL for Temporal.

Provider errors often quote the recipient ("550 5.1.1 <ada@example.com>: no such
user"). The ledger keeps the full text (PostgreSQL holds personal data); what goes into
a workflow's history (activity results, failure messages) names ids instead, so a
history can be read, exported or kept without becoming a copy of the address book.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_EMAIL = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.\-]+@[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9\-]+)+")
_HANDLE = re.compile(r"(?<![\w@.])@[A-Za-z0-9_]{1,50}\b")
_URL = re.compile(r"https?://[^\s<>\"']+", re.IGNORECASE)
_WALLET = re.compile(r"\b0x[0-9a-fA-F]{40}\b")


def redact(text: str | None, *values: str | None, label: str = "the recipient") -> str | None:
    """`text` with `values` (e.g. the identity's value) and anything address-like replaced."""
    if text is None:
        return None
    out = text
    for value in sorted(_present(values), key=len, reverse=True):
        out = re.sub(re.escape(value), f"<{label}>", out, flags=re.IGNORECASE)
    out = _EMAIL.sub("<address>", out)
    out = _URL.sub("<url>", out)
    out = _WALLET.sub("<wallet>", out)
    return _HANDLE.sub("@<handle>", out)


def _present(values: Iterable[str | None]) -> list[str]:
    return [v for v in values if v and len(v) >= 3]
