"""Click tracking: links rewritten to `/c/{token}`, the target URL sealed in the token.

The token (services/tokens.py, purpose "click") carries the delivery key and the exact
target URL, encrypted and authenticated with LINK_SECRET, so `/c/` can only ever
redirect to a URL we put in a message: there is no open redirect, and a forged or
altered token is a 404. Only http(s) links in `<a href>` of the HTML part are rewritten
(not mailto:, tel:, in-page anchors, or the unsubscribe link, which the composition adds
afterwards); the text part keeps its original links unless the sequence sets
`track_clicks_in_text`, because a rewritten link in plain text is visibly not the one
the writer typed.
"""

from __future__ import annotations

import html as html_lib
import re
from collections.abc import Callable
from urllib.parse import urlsplit

_HREF = re.compile(r"""(<a\b[^>]*?\bhref\s*=\s*)(["'])(.*?)\2""", re.IGNORECASE | re.DOTALL)
_TEXT_URL = re.compile(r"""https?://[^\s<>"'()\[\]]+[^\s<>"'()\[\].,;:!?]""", re.IGNORECASE)


def trackable(url: str) -> bool:
    """An absolute http(s) URL with a host: the only kind `/c/` will ever redirect to."""
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.netloc) and not any(c in url for c in "\r\n\t ")


def rewrite_html(html: str, link_for: Callable[[str], str]) -> str:
    """Every trackable `<a href>` replaced by `link_for(original URL)`."""

    def one(match: re.Match[str]) -> str:
        prefix, quote, raw = match.group(1), match.group(2), match.group(3)
        url = html_lib.unescape(raw).strip()
        if not trackable(url):
            return match.group(0)
        return f"{prefix}{quote}{html_lib.escape(link_for(url), quote=True)}{quote}"

    return _HREF.sub(one, html)


def rewrite_text(text: str, link_for: Callable[[str], str]) -> str:
    """Bare http(s) URLs of a text part replaced (only when the sequence asks for it)."""
    return _TEXT_URL.sub(lambda m: link_for(m.group(0)) if trackable(m.group(0)) else m.group(0), text)
