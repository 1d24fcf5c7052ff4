"""The new text of an inbound reply: the quoted history below it is dropped.

Providers that do not strip quotes themselves (SendGrid Inbound Parse, Resend) deliver
the whole message; classifying "yes, interested" should not read the quoted pitch.
"""

from __future__ import annotations

import re

_ATTRIBUTION = re.compile(
    r"^(On .{0,300}wrote:|-{2,}\s*Original Message\s*-{2,}|_{5,}|From:\s.+)$", re.IGNORECASE | re.MULTILINE
)


def reply_text(text: str) -> str:
    """Lines before the first attribution line or quote block (the whole text when none)."""
    cut = _ATTRIBUTION.search(text)
    head = text[: cut.start()] if cut else text
    kept = [line for line in head.splitlines() if not line.lstrip().startswith(">")]
    result = "\n".join(kept).strip()
    return result or text.strip()
