"""The links inside our messages: unsubscribe (`/u/`), the open pixel (`/o/`), clicks (`/c/`).

Each token is sealed with LINK_SECRET (services/tokens.py) for one purpose; one that does
not read is refused (unsubscribe: 400 page; click: 404 page, so `/c/` is no open redirect)
or, for the pixel, served the image anyway. Opens and clicks are statistics: the person
gets the image or their link even when recording fails. Unsubscribing is not: the page
says so when it could not be recorded, so that the person tries again.
"""

from __future__ import annotations

import html
import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Response
from fastapi.responses import HTMLResponse, RedirectResponse

from services.click_tracking import trackable
from services.engagement import record_click, record_open
from services.tokens import TokenError, read_token
from webhooks.deps import PipelineDep, SessionsDep, SettingsDep
from webhooks.pages import INVALID_LINK, LINK_NOT_FOUND, page
from webhooks.refusal import Refusal

log = logging.getLogger("sequencer.webhooks")
router = APIRouter()
PIXEL = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
NO_STORE = {"Cache-Control": "no-store, max-age=0"}


def unsubscribing_person(token: str, settings: SettingsDep) -> int:
    """The person an unsubscribe token names; a 400 page when it does not read."""
    try:
        return int(read_token(settings.link_keys(), "unsubscribe", token)["p"])
    except (TokenError, KeyError, TypeError, ValueError) as err:
        raise Refusal(HTMLResponse(INVALID_LINK, 400)) from err


Person = Annotated[int, Depends(unsubscribing_person)]


@router.get("/u/{token}", response_class=HTMLResponse)
async def unsubscribe_page(token: str, _person: Person) -> HTMLResponse:
    """A confirmation button: link scanners that fetch the page unsubscribe nobody."""
    form = (
        f'<form method="post" action="/u/{html.escape(token)}">'
        '<input type="hidden" name="List-Unsubscribe" value="One-Click">'
        '<button type="submit">Unsubscribe</button></form>'
    )
    return HTMLResponse(page("Unsubscribe?", "<p>Press the button to stop all messages from us.</p>" + form))


@router.post("/u/{token}")
async def unsubscribe(person_id: Person, pipeline: PipelineDep) -> Response:
    """The button, and RFC 8058 one-click: suppressed whether or not Temporal is there."""
    try:
        await pipeline.unsubscribe_by_link(person_id)
    except Exception:  # nothing was written: say so, so that the person tries again
        log.exception("unsubscribe of person %s failed", person_id)
        return HTMLResponse(page("Please try again", "<p>We could not record your request just now.</p>"), 503)
    return HTMLResponse(page("You are unsubscribed", "<p>You will not hear from us again.</p>"))


@router.get("/o/{token}")
async def opened(token: str, settings: SettingsDep, sessions: SessionsDep) -> Response:
    """The open pixel: one `opened` event per delivery; the image whatever happens."""
    try:
        key = str(read_token(settings.link_keys(), "open", token)["k"])
    except (TokenError, KeyError):
        return Response(PIXEL, media_type="image/gif", headers=NO_STORE)
    try:
        await record_open(sessions, key)
    except Exception:  # an open is statistics: the image is served whatever happens
        log.exception("recording an open failed")
    return Response(PIXEL, media_type="image/gif", headers=NO_STORE)


@router.get("/c/{token}")
async def click(token: str, settings: SettingsDep, sessions: SessionsDep) -> Response:
    """A tracked link: one `clicked` event per delivery and link, then the sealed URL."""
    try:
        data = read_token(settings.link_keys(), "click", token)
        key, url = str(data["k"]), str(data["u"])
    except (TokenError, KeyError, TypeError):
        return HTMLResponse(LINK_NOT_FOUND, status_code=404)
    if not trackable(url):
        return HTMLResponse(LINK_NOT_FOUND, status_code=404)
    try:
        await record_click(sessions, key, url)
    except Exception:  # statistics only: never keep the person from their link
        log.exception("recording a click failed")
    headers = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}
    return RedirectResponse(url, status_code=302, headers=headers)
