"""Reply classification, before any workflow is signalled.

An auto-reply is not a reply (the lead should move past the return date, not branch to
"thanks for replying"), and "please remove me" must stop everything, whatever the
sequence says. The default classifier is rule-based (English, German, French, Spanish),
runs on the reply with quoted history stripped, and is pluggable: register another
`ReplyClassifier` under a name and select it with `get_classifier(name)`.

Precedence: unsubscribe > out_of_office > negative > positive > neutral.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import date, datetime
from typing import Literal, Protocol

from pydantic import BaseModel

Label = Literal["out_of_office", "unsubscribe", "positive", "negative", "neutral"]


class Classification(BaseModel):
    """The verdict on one reply."""

    label: Label
    return_date: date | None = None
    confidence: float = 0.5
    matched: str | None = None


class ReplyClassifier(Protocol):
    """Anything that can classify a reply."""

    def classify(self, text: str, *, received_at: datetime) -> Classification: ...


def _fold(text: str) -> str:
    """Lowercase without accents, so "désabonner" and "desabonner" match alike."""
    decomposed = unicodedata.normalize("NFKD", text.lower())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


_QUOTE_HEADERS = re.compile(
    r"^(on .{0,200}wrote:|am .{0,200}schrieb .{0,200}:|le .{0,200}a ecrit\s*:|el .{0,200}escribio:"
    r"|-{2,}\s*original message\s*-{2,}|-{2,}\s*urspr.ngliche nachricht\s*-{2,}|from:\s.*|von:\s.*|de\s*:\s.*)$",
    re.IGNORECASE,
)


def strip_quoted(text: str) -> str:
    """The new part of a reply: drop quoted lines ("> ...") and everything after a quote header."""
    kept: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if _QUOTE_HEADERS.match(_fold(stripped)):
            break
        if stripped.startswith(">"):
            continue
        kept.append(line)
    return "\n".join(kept).strip()


def _rx(*patterns: str) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{p})" for p in patterns))


UNSUBSCRIBE = _rx(
    r"\bunsubscribe\b",
    r"\bremove me\b",
    r"\btake me off\b",
    r"\bopt(?:ing)?[ -]?out\b",
    r"\bstop (?:e-?mailing|messaging|contacting|sending|writing)\b",
    r"\bdo not (?:contact|email|e-mail|message|write)\b",
    r"\bdon'?t (?:contact|email|e-mail|message|write to) me\b",
    r"\bno (?:more|further) (?:emails|messages)\b",
    r"\babmelden\b",
    r"\baustragen\b",
    r"\bkeine (?:weiteren )?(?:e-?mails|nachrichten)\b",
    r"\bnicht mehr (?:kontaktieren|anschreiben|schreiben)\b",
    r"\bdesabonn",
    r"\bdesinscri",
    r"\bne (?:plus )?me (?:contactez|ecrivez) plus\b",
    r"\bretirez[- ]moi\b",
    r"\bdarme de baja\b",
    r"\bdar de baja\b",
    r"\bno me (?:escrib|contact)\w* mas\b",
    r"\beliminadme\b|\beliminame\b|\bborrame\b",
)
OUT_OF_OFFICE = _rx(
    r"\bout of (?:the )?office\b",
    r"\bauto(?:matic)?[ -]?reply\b",
    r"\bon (?:annual |parental |maternity |paternity )?leave\b",
    r"\bon vacation\b|\bon holiday\b",
    r"\baway from (?:my desk|the office)\b",
    r"\bi am (?:currently )?(?:away|traveling|travelling|out)\b",
    r"\bi'?m (?:currently )?(?:away|traveling|travelling|out of)\b",
    r"\blimited access to (?:my )?e-?mail\b",
    r"\babwesenheitsnotiz\b|\bnicht im buro\b|\bbin (?:ab|bis) .{0,40}(?:abwesend|im urlaub)\b",
    r"\bim urlaub\b|\babwesend\b",
    r"\babsent du bureau\b|\bje suis absente?\b|\ben conges?\b|\ben vacances\b",
    r"\bfuera de la oficina\b|\bausente\b|\bde vacaciones\b|\brespuesta automatica\b",
)
NEGATIVE = _rx(
    r"\bnot interested\b",
    r"\bno interest\b",
    r"\bnot (?:a )?(?:good )?fit\b",
    r"\bnot (?:right )?now\b",
    r"\bno thanks?\b|\bno,? thank you\b",
    r"\bwe(?:'re| are) (?:all )?(?:set|good)\b",
    r"\bnot looking\b",
    r"\bplease don'?t\b",
    r"\bkein interesse\b|\bnicht interessiert\b|\bnein danke\b",
    r"\bpas interesse\b|\bnon merci\b|\bca ne nous interesse pas\b",
    r"\bno (?:me |nos )?interesa\b|\bno gracias\b|\bno,? gracias\b",
)
POSITIVE = _rx(
    r"\binterested\b",
    r"\bsounds (?:good|great|interesting)\b",
    r"\blet'?s (?:talk|chat|connect|meet|do it|set up)\b",
    r"\bhappy to (?:chat|talk|connect|meet)\b",
    r"\b(?:book|schedule|set up) (?:a )?(?:call|meeting|time|demo)\b",
    r"\bsend (?:me )?(?:more )?(?:info|details|information)\b",
    r"\bwhen are you (?:free|available)\b",
    r"\bcalendly\b|\bmy calendar\b",
    r"\btell me more\b|\bi'?d love to\b|\byes,? please\b",
    r"\bgerne\b|\bklingt gut\b|\binteressant\b|\blass(?:t)? uns\b",
    r"\bavec plaisir\b|\bca m'?interesse\b|\binteresse\b|\bparlons\b",
    r"\bme interesa\b|\bsuena bien\b|\bhablemos\b|\bcon gusto\b",
)

_MONTHS = {
    # English
    "january": 1, "february": 2, "march": 3, "april": 4, "may": 5, "june": 6, "july": 7,
    "august": 8, "september": 9, "october": 10, "november": 11, "december": 12,
    "jan": 1, "feb": 2, "mar": 3, "apr": 4, "jun": 6, "jul": 7, "aug": 8, "sep": 9, "sept": 9,
    "oct": 10, "nov": 11, "dec": 12,
    # German
    "januar": 1, "februar": 2, "marz": 3, "mai": 5, "juni": 6, "juli": 7, "oktober": 10, "dezember": 12,
    # French
    "janvier": 1, "fevrier": 2, "mars": 3, "avril": 4, "juin": 6, "juillet": 7, "aout": 8,
    "septembre": 9, "octobre": 10, "novembre": 11, "decembre": 12,
    # Spanish
    "enero": 1, "febrero": 2, "marzo": 3, "abril": 4, "mayo": 5, "junio": 6, "julio": 7, "agosto": 8,
    "septiembre": 9, "setiembre": 9, "octubre": 10, "noviembre": 11, "diciembre": 12,
}  # fmt: skip
_MONTH_NAMES = "|".join(sorted(_MONTHS, key=len, reverse=True))
_ISO = re.compile(r"\b(20\d\d)-(\d\d)-(\d\d)\b")
_DAY_MONTH = re.compile(
    rf"\b(\d{{1,2}})(?:st|nd|rd|th|er|\.)?\s+(?:de\s+)?({_MONTH_NAMES})\b\.?(?:\s+(?:de\s+)?(20\d\d))?"
)
_MONTH_DAY = re.compile(rf"\b({_MONTH_NAMES})\.?\s+(\d{{1,2}})(?:st|nd|rd|th)?\b(?:,?\s+(20\d\d))?")
_NUMERIC = re.compile(r"\b(\d{1,2})[./](\d{1,2})(?:[./](20\d\d|\d\d))?\b")
_RETURN_CUE = re.compile(
    r"(back|return|returning|until|till|through|zuruck|wieder|bis|retour|jusqu|de vuelta|regreso|hasta|vuelvo)"
)


def _future(day: int, month: int, year: int | None, ref: date) -> date | None:
    try:
        candidate = date(year or ref.year, month, day)
    except ValueError:
        return None
    if year is None and candidate < ref:
        try:
            candidate = date(ref.year + 1, month, day)
        except ValueError:
            return None
    return candidate


def extract_return_date(text: str, received_at: datetime) -> date | None:
    """The return date an out-of-office gives, read relative to when it arrived."""
    folded = _fold(text)
    ref = received_at.date()
    cue = _RETURN_CUE.search(folded)
    scope = folded[cue.start() :] if cue else folded
    found: list[date] = []
    for m in _ISO.finditer(scope):
        d = _future(int(m.group(3)), int(m.group(2)), int(m.group(1)), ref)
        if d:
            found.append(d)
    for m in _DAY_MONTH.finditer(scope):
        d = _future(int(m.group(1)), _MONTHS[m.group(2)], int(m.group(3)) if m.group(3) else None, ref)
        if d:
            found.append(d)
    for m in _MONTH_DAY.finditer(scope):
        d = _future(int(m.group(2)), _MONTHS[m.group(1)], int(m.group(3)) if m.group(3) else None, ref)
        if d:
            found.append(d)
    if not found:
        for m in _NUMERIC.finditer(scope):
            year = m.group(3)
            y = (2000 + int(year) if len(year) == 2 else int(year)) if year else None
            d = _future(int(m.group(1)), int(m.group(2)), y, ref)  # day/month, as in most of the world
            if d:
                found.append(d)
    future = [d for d in found if d >= ref]
    return min(future) if future else None


class RuleBasedClassifier:
    """Regular expressions over the folded, unquoted reply."""

    def classify(self, text: str, *, received_at: datetime) -> Classification:
        """Classify one reply."""
        body = _fold(strip_quoted(text) or text)
        if m := UNSUBSCRIBE.search(body):
            return Classification(label="unsubscribe", confidence=0.9, matched=m.group(0))
        if m := OUT_OF_OFFICE.search(body):
            return Classification(
                label="out_of_office",
                confidence=0.85,
                matched=m.group(0),
                return_date=extract_return_date(body, received_at),
            )
        if m := NEGATIVE.search(body):
            return Classification(label="negative", confidence=0.75, matched=m.group(0))
        if m := POSITIVE.search(body):
            return Classification(label="positive", confidence=0.7, matched=m.group(0))
        return Classification(label="neutral", confidence=0.4)


_REGISTRY: dict[str, ReplyClassifier] = {"rules": RuleBasedClassifier()}


def register_classifier(name: str, classifier: ReplyClassifier) -> None:
    """Make a classifier selectable by name."""
    _REGISTRY[name] = classifier


def get_classifier(name: str = "rules") -> ReplyClassifier:
    """A registered classifier (KeyError lists the known names)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown classifier {name!r} (known: {', '.join(sorted(_REGISTRY))})") from None
