"""The few HTML pages people see (unsubscribe, broken links): plain, escaped, no assets."""

from __future__ import annotations

import html


def page(title: str, body: str) -> str:
    """A minimal page; `body` is HTML already escaped by the caller."""
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title></head>"
        f"<body style='font-family:sans-serif;max-width:32rem;margin:4rem auto'>"
        f"<h1>{html.escape(title)}</h1>{body}</body></html>"
    )


INVALID_LINK = page("This link is not valid", "<p>The link may be incomplete.</p>")
LINK_NOT_FOUND = page(
    "Link not found",
    "<p>This link is incomplete or was changed. Please use the link exactly as it appears in the email.</p>",
)
