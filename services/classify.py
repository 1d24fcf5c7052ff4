"""Reply classification, before any workflow is signalled.

An auto-reply is not a reply (the lead should move past the return date, not branch to
"thanks for replying"), and "please remove me" must stop everything, whatever the
sequence says. The default classifier is rule-based (English, German, French, Spanish),
runs on the new part of the reply only (quoted history, our own footer in it and the
signature are stripped), and is pluggable: register another `ReplyClassifier` under a
name and select it with `get_classifier(name)`.

Decision order:

1. unsubscribe intent, unless negated ("please don't unsubscribe me", "nicht abmelden");
2. out-of-office when the text is plainly an auto-reply ("automatic reply",
   "Abwesenheitsnotiz", "limited access to email", ...);
3. negative, including a negated positive ("I don't think we'd be interested") and a
   decline for now ("not interested right now but maybe next quarter" is negative);
4. positive: a human who says yes and mentions being away ("yes, let's talk, but I'm
   out until Monday") is positive, not out-of-office; the return date is still given;
5. out-of-office on weaker cues ("I'm on vacation until ...");
6. neutral.

Return dates (`extract_return_date`), read relative to when the reply arrived:

* written dates in the four languages: "3 December", "Dec 3rd", "3rd of December",
  "3. Dezember", "3 de diciembre", ISO "2024-12-03"; without a year the next such date
  (a date up to 30 days past is taken as this year's and so no return date);
* dots are day.month ("03.12." is 3 December); a slash is ambiguous ("12/3"): when both
  readings are dates the sooner future one wins (absences are short), when only one
  reading is a valid date ("12/27") that one;
* weekdays and "tomorrow", "next week": "Monday" and "next Monday" both mean the first
  Monday after the day the reply arrived;
* a date after a return cue ("back on", "returning", "wieder ab", "de retour le")
  beats one after an until cue ("until", "bis", "jusqu'au", "hasta"); with no cue the
  latest date of a range ("du 25 novembre au 2 décembre") is the end of the absence;
* an explicitly inclusive end ("through", "bis einschließlich", "inclus") means back
  the day after.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import date, datetime, timedelta
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


_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'", "\u00b4": "'"})


def _fold(text: str) -> str:
    """Lowercase without accents, so "désabonner" and "desabonner" match alike."""
    decomposed = unicodedata.normalize("NFKD", text.lower().replace("ß", "ss").translate(_APOSTROPHES))
    return "".join(c for c in decomposed if not unicodedata.combining(c))


# ------------------------------------------------------------------ quoted text and signatures
_QUOTE_HEADERS = re.compile(
    r"^(on\s.{0,300}wrote\s*:|am\s.{0,300}schrieb.{0,300}:|le\s.{0,300}a ecrit\s*:|el\s.{0,300}escribio\s*:"
    r"|-{2,}\s*(?:original message|forwarded message|urspr.ngliche nachricht|message d'origine|mensaje original)"
    r"\s*-{2,}|_{10,}|(?:from|von|de|sent|gesendet|envoye|enviado)\s*:\s.*)$",
    re.IGNORECASE,
)
_HEADER_START = re.compile(r"^(on|am|le|el)\s", re.IGNORECASE)
_SIGNATURE = re.compile(
    r"^(--\s*|sent from my .*|gesendet von meinem .*|envoye de mon .*|enviado desde mi .*|get outlook for .*)$",
    re.IGNORECASE,
)


def strip_quoted(text: str) -> str:
    """The new part of a reply.

    Lines quoted with ">" are dropped wherever they are (so bottom-posted replies keep
    their text); a quote header ("On … wrote:", possibly wrapped over two lines, "Am …
    schrieb", "Le … a écrit", "El … escribió", an Outlook "From:" block or separator)
    ends the new part unless only ">" lines follow it; a signature delimiter ("-- ",
    "Sent from my iPhone") ends it too.
    """
    lines = text.splitlines()
    kept: list[str] = []
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        folded = _fold(stripped)
        header = bool(_QUOTE_HEADERS.match(folded))
        if not header and _HEADER_START.match(folded) and i + 1 < len(lines):
            joined = f"{folded} {_fold(lines[i + 1].strip())}"
            if _QUOTE_HEADERS.match(joined) and not folded.endswith(":"):
                header = True
                i += 1
        if header:
            rest = [line.strip() for line in lines[i + 1 :] if line.strip()]
            if rest and rest[0].startswith(">"):
                i += 1
                continue  # bottom-posting: quoted block, then possibly the new text
            break
        if _SIGNATURE.match(folded) or stripped == "--":
            break
        if not stripped.startswith(">"):
            kept.append(lines[i])
        i += 1
    return "\n".join(kept).strip()


def _rx(*patterns: str) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{p})" for p in patterns))


UNSUBSCRIBE = _rx(
    r"\bunsubscrib\w*",
    r"\bremove (?:me|us|my (?:address|email))\b",
    r"\btake (?:me|us|my (?:address|email)) off\b",
    r"\bopt(?:ing)?[ -]?out\b",
    r"\bstop (?:e-?mailing|messaging|contacting|sending|writing|spamming)\b",
    r"\b(?:do not|don't|never) (?:ever )?(?:contact|e-?mail|message|write to|reach out to) (?:me|us)\b",
    r"\b(?:do not|don't) want (?:any )?(?:more|further) (?:e-?mails|messages|mails)\b",
    r"\bno (?:more|further) (?:e-?mails|messages)\b",
    r"\b(?:mailing|distribution|e-?mail) list\b.{0,20}\bremove\b",
    # German
    r"\babmelden\b|\babbestellen\b|\baustragen\b",
    r"\btragen sie mich\b.{0,40}\baus\b",
    r"\b(?:aus|von) (?:ihrem|ihrer|eurem|eurer|dem|der|diesem|dieser) (?:e-?mail-?)?(?:verteiler|mailingliste|liste)\b",
    r"\bkeine (?:weiteren )?(?:e-?mails|nachrichten|mails)\b",
    r"\bnicht mehr (?:kontaktieren|anschreiben|schreiben|anrufen)\b",
    r"\b(?:kontaktieren|schreiben|anschreiben|mailen) sie mi(?:ch|r) (?:bitte )?nicht mehr\b",
    # French
    r"\bdesabonn\w*|\bdesinscri\w*",
    r"\b(?:retirez|supprimez|enlevez|rayez)[- ]moi\b",
    r"\bme (?:retirer|supprimer|desinscrire|desabonner|enlever|rayer)\b",
    r"\bne (?:plus )?me (?:contactez|ecrivez|sollicitez) plus\b",
    r"\bne plus m'?(?:ecrire|contacter|envoyer|solliciter)\b",
    # Spanish
    r"\bde baja\b|\bdarme de baja\b",
    r"\bno me (?:escrib|contact|envi)\w* mas\b",
    r"\beliminadme\b|\beliminame\b|\bborrame\b|\bsacadme\b|\bsacame\b",
)
_STOP_ONLY = re.compile(r"^\W*(?:stop|stopp|arret|alto|baja)\W*$")
#: Words that negate what follows them in the same clause.
_NEGATION = re.compile(
    r"(?:\bnot\b|\bnever\b|n't\b|\bno need to\b|\bnicht\b|\bkein\w*|\bne\b|\bn'|\bpas\b|\bno (?:me|nos|le|les)\b)"
)
_CLAUSE_BREAK = re.compile(r"[.,;:!?\n()\u2013\u2014]|\s-\s|\bbut\b|\baber\b|\bmais\b|\bpero\b")

AUTO_REPLY = _rx(
    r"\bauto(?:matic|matische|mated)?[ -]?(?:reply|response|antwort|message)\b",
    r"\bautoreply\b|\bauto-reply\b",
    r"\b(?:reponse|message) automatique\b|\brespuesta automatica\b|\bmensaje automatico\b",
    r"\babwesenheitsnotiz\b|\babwesenheitsassistent\b",
    r"\b(?:limited|no|without) access to (?:my )?e-?mails?\b",
    r"\beingeschrankte?m? zugriff\b|\bacces limite\b|\bacceso limitado\b",
    r"\b(?:message|e-?mail) will not be forwarded\b|\bwird nicht weitergeleitet\b",
    r"\bin dringenden fallen\b|\bfor urgent (?:matters|issues|requests|inquiries)\b|\bpour toute urgence\b",
    r"\bpara asuntos urgentes\b",
)
OUT_OF_OFFICE = _rx(
    r"\bout of (?:the )?office\b",
    r"\bon (?:annual |parental |maternity |paternity |sick |medical )?leave\b",
    r"\bon (?:vacation|holiday|holidays|pto|sabbatical)\b",
    r"\baway from (?:my desk|the office|work)\b",
    r"\b(?:i am|i'm|i will be|i'll be) (?:currently )?(?:away|traveling|travelling|out|off)\b",
    r"\bnicht im buro\b|\bim urlaub\b|\babwesend\b|\bnicht erreichbar\b|\bin elternzeit\b",
    r"\babsente? du bureau\b|\bje suis absente?\b|\ben conges?\b|\ben vacances\b|\bje serai absente?\b",
    r"\bfuera de la oficina\b|\bausente\b|\bde vacaciones\b|\bde permiso\b",
)
NEGATIVE = _rx(
    r"\bnot (?:really |currently |at all )?interested\b",
    r"\bno interest\b",
    r"\b(?:not|isn't|is not|wouldn't be|not really) (?:a |the )?(?:good |great |right )?fit\b",
    r"\bnot (?:right )?now\b|\bnot (?:this|at this) (?:quarter|year|month|time)\b",
    r"\bno thanks?\b|\bno,? thank you\b",
    r"\bwe(?:'re| are) (?:all )?(?:set|good)\b",
    r"\bnot looking\b",
    r"\b(?:already|currently) (?:use|using|have|work with|working with|signed with)\b",
    r"\bkein(?:en)? (?:interesse|bedarf)\b|\bnicht interessiert\b|\bnein,? danke\b",
    r"\bpas interesse\w*|\bnon,? merci\b|\bne (?:m'|nous |me )?interesse(?:nt)? (?:pas|plus)\b",
    r"\bpas (?:besoin|pour nous)\b",
    r"\bno (?:me |nos )?interesa\b|\bno,? gracias\b",
)
POSITIVE = _rx(
    r"\binterested\b",
    r"\bsounds? (?:good|great|interesting|promising)\b",
    r"\blet'?s (?:talk|chat|connect|meet|do it|set up|schedule|find a time)\b",
    r"\bhappy to (?:chat|talk|connect|meet|hop on)\b",
    r"\b(?:book|schedule|set up|arrange) (?:a )?(?:call|meeting|time|demo|chat)\b",
    r"\bsend (?:me |us |over )?(?:more |some )?(?:info|details|information|pricing|the deck|your deck)\b",
    r"\bwhen are you (?:free|available)\b|\b(?:i'm|i am) (?:free|available)\b",
    r"\bcalendly\b|\bmy calendar\b",
    r"\btell me more\b|\bi'?d love to\b|\byes,? please\b|\bi'?d be (?:happy|glad) to\b",
    r"\bgerne?\b|\bklingt (?:gut|spannend|interessant)\b|\binteressant\b|\blass(?:t)? uns\b",
    r"\bschicken sie mir\b|\bsenden sie mir\b",
    r"\bavec plaisir\b|\bca m'interesse\b|\binteresse\b|\bparlons\b|\bje suis disponible\b|\bvolontiers\b",
    r"\bme interesa\b|\bsuena bien\b|\bhablemos\b|\bcon gusto\b|\bestoy disponible\b",
    # a reply that opens with a plain yes ("Sure.", "Oui, pourquoi pas", "Sí, claro")
    r"^\W*(?:yes|yeah|yep|sure|absolutely|definitely|ja|jawohl|oui|si|claro|por supuesto|bien sur)\b",
)


def _negated(body: str, start: int) -> bool:
    """Whether a negation stands within the last few words of the clause before `start`."""
    before = body[:start]
    breaks = list(_CLAUSE_BREAK.finditer(before))
    clause = before[breaks[-1].end() :] if breaks else before
    words = clause.split()[-4:]
    return bool(_NEGATION.search(" ".join(words)))


def _first_unnegated(pattern: re.Pattern[str], body: str) -> tuple[re.Match[str] | None, re.Match[str] | None]:
    """The first match not negated, and the first negated one."""
    negated = None
    for m in pattern.finditer(body):
        if _negated(body, m.start()):
            negated = negated or m
            continue
        return m, negated
    return None, negated


# ------------------------------------------------------------------ return dates
_MONTHS = {
    # English
    "january": 1, "february": 2, "march": 3, "april": 4, "may": 5, "june": 6, "july": 7,
    "august": 8, "september": 9, "october": 10, "november": 11, "december": 12,
    "jan": 1, "feb": 2, "mar": 3, "apr": 4, "jun": 6, "jul": 7, "aug": 8, "sep": 9, "sept": 9,
    "oct": 10, "nov": 11, "dec": 12,
    # German
    "januar": 1, "janner": 1, "februar": 2, "marz": 3, "mai": 5, "juni": 6, "juli": 7, "oktober": 10,
    "okt": 10, "dezember": 12, "dez": 12,
    # French
    "janvier": 1, "fevrier": 2, "mars": 3, "avril": 4, "juin": 6, "juillet": 7, "aout": 8,
    "septembre": 9, "octobre": 10, "novembre": 11, "decembre": 12,
    # Spanish
    "enero": 1, "febrero": 2, "marzo": 3, "abril": 4, "mayo": 5, "junio": 6, "julio": 7, "agosto": 8,
    "septiembre": 9, "setiembre": 9, "octubre": 10, "noviembre": 11, "diciembre": 12,
}  # fmt: skip
_WEEKDAYS = {
    "monday": 0, "tuesday": 1, "wednesday": 2, "thursday": 3, "friday": 4, "saturday": 5, "sunday": 6,
    "montag": 0, "dienstag": 1, "mittwoch": 2, "donnerstag": 3, "freitag": 4, "samstag": 5, "sonntag": 6,
    "lundi": 0, "mardi": 1, "mercredi": 2, "jeudi": 3, "vendredi": 4, "samedi": 5, "dimanche": 6,
    "lunes": 0, "martes": 1, "miercoles": 2, "jueves": 3, "viernes": 4, "sabado": 5, "domingo": 6,
}  # fmt: skip
_MONTH_NAMES = "|".join(sorted(_MONTHS, key=len, reverse=True))
_ISO = re.compile(r"\b(20\d\d)-(\d\d)-(\d\d)\b")
_DAY_MONTH = re.compile(
    rf"\b(\d{{1,2}})(?:st|nd|rd|th|er|\.)?\s+(?:of\s+|de\s+)?({_MONTH_NAMES})\b\.?(?:,?\s+(?:de\s+)?(20\d\d))?"
)
_MONTH_DAY = re.compile(rf"\b({_MONTH_NAMES})\.?\s+(\d{{1,2}})(?:st|nd|rd|th)?\b(?:,?\s+(20\d\d))?")
_DOTTED = re.compile(r"\b(\d{1,2})\.(\d{1,2})\.(20\d\d|\d\d(?!\d))?(?!\d)")
_SLASHED = re.compile(r"\b(\d{1,2})/(\d{1,2})(?:/(20\d\d|\d\d))?\b")
_WEEKDAY = re.compile(r"\b(" + "|".join(_WEEKDAYS) + r")\b")
_RELATIVE = re.compile(
    r"\b(tomorrow|morgen|demain|manana|next week|nachste woche|kommende woche|la semaine prochaine"
    r"|semaine prochaine|la proxima semana|la semana que viene)\b"
)
_RETURN_CUES = re.compile(
    r"\b(?:back|return|returning|returns|zuruck|wieder|retour|de vuelta|regreso|regresare|vuelvo|volvere)\b"
)
#: Cues whose date usually comes first ("ab Montag wieder erreichbar").
_VERB_LAST_CUES = {"wieder", "zuruck"}
_BEFORE_WINDOW = 25
_UNTIL_CUES = re.compile(r"\b(?:until|till|til|through|thru|to|bis|jusqu|au|hasta|al)\b")
_INCLUSIVE = re.compile(r"\b(?:through|thru|inclusive|including|einschliesslich|einschl|inklusive|inclus|incluido)\b")
_WINDOW = 60


def _resolve(day: int, month: int, year: int | None, ref: date) -> date | None:
    """A calendar date; without a year, the next one (up to 30 days back counts as this year)."""
    try:
        candidate = date(year or ref.year, month, day)
    except ValueError:
        return None
    if year is None and candidate < ref - timedelta(days=30):
        try:
            candidate = date(ref.year + 1, month, day)
        except ValueError:
            return None
    return candidate


def _year(text: str | None) -> int | None:
    if not text:
        return None
    return 2000 + int(text) if len(text) == 2 else int(text)


def _explicit_dates(text: str, ref: date) -> list[tuple[int, int, date]]:
    """(start, end, date) of every written date, in order of position."""
    found: list[tuple[int, int, date]] = []
    for m in _ISO.finditer(text):
        if d := _resolve(int(m.group(3)), int(m.group(2)), int(m.group(1)), ref):
            found.append((m.start(), m.end(), d))
    for m in _DAY_MONTH.finditer(text):
        if d := _resolve(int(m.group(1)), _MONTHS[m.group(2)], _year(m.group(3)), ref):
            found.append((m.start(), m.end(), d))
    for m in _MONTH_DAY.finditer(text):
        if d := _resolve(int(m.group(2)), _MONTHS[m.group(1)], _year(m.group(3)), ref):
            found.append((m.start(), m.end(), d))
    for m in _DOTTED.finditer(text):
        if d := _resolve(int(m.group(1)), int(m.group(2)), _year(m.group(3)), ref):
            found.append((m.start(), m.end(), d))
    for m in _SLASHED.finditer(text):
        a, b, y = int(m.group(1)), int(m.group(2)), _year(m.group(3))
        readings = [d for d in (_resolve(a, b, y, ref), _resolve(b, a, y, ref)) if d is not None and d >= ref]
        if readings:
            found.append((m.start(), m.end(), min(readings)))
    found.sort(key=lambda f: f[0])
    # drop matches inside an earlier one ("3 December 2024" also holds "December 2024")
    out: list[tuple[int, int, date]] = []
    for item in found:
        if out and item[0] < out[-1][1]:
            continue
        out.append(item)
    return out


def _relative_dates(text: str, ref: date) -> list[tuple[int, int, date]]:
    found: list[tuple[int, int, date]] = []
    for m in _WEEKDAY.finditer(text):
        ahead = (_WEEKDAYS[m.group(1)] - ref.weekday() - 1) % 7 + 1
        found.append((m.start(), m.end(), ref + timedelta(days=ahead)))
    for m in _RELATIVE.finditer(text):
        word = m.group(1)
        if word in ("tomorrow", "morgen", "demain", "manana"):
            found.append((m.start(), m.end(), ref + timedelta(days=1)))
        else:
            found.append((m.start(), m.end(), ref + timedelta(days=7 - ref.weekday())))
    found.sort(key=lambda f: f[0])
    return found


def _after_cue(
    text: str, cues: re.Pattern[str], explicit: list[tuple[int, int, date]], relative: list[tuple[int, int, date]]
) -> tuple[int, int, date] | None:
    """The first date written shortly after a cue (written dates beat weekdays)."""
    for cue in cues.finditer(text):
        for candidates in (explicit, relative):
            for start, end, d in candidates:
                if cue.end() <= start <= cue.end() + _WINDOW:
                    return cue.start(), end, d
            if cue.group(0) in _VERB_LAST_CUES:
                for start, end, d in reversed(candidates):
                    if cue.start() - _BEFORE_WINDOW <= end <= cue.start():
                        return start, cue.end(), d
    return None


def extract_return_date(text: str, received_at: datetime) -> date | None:
    """The return date an out-of-office gives, read relative to when it arrived."""
    folded = _fold(text)
    ref = received_at.date()
    explicit = [f for f in _explicit_dates(folded, ref) if f[2] >= ref]
    relative = _relative_dates(folded, ref)
    hit = _after_cue(folded, _RETURN_CUES, explicit, relative)
    inclusive = False
    if hit is None:
        hit = _after_cue(folded, _UNTIL_CUES, explicit, relative)
        if hit is not None:
            inclusive = bool(_INCLUSIVE.search(folded, hit[0], min(len(folded), hit[1] + 12)))
    if hit is None and explicit:
        latest = max(explicit, key=lambda f: f[2])
        hit = latest
        inclusive = bool(_INCLUSIVE.search(folded, max(0, latest[0] - 30), min(len(folded), latest[1] + 12)))
    if hit is None:
        return None
    return hit[2] + timedelta(days=1) if inclusive else hit[2]


# ------------------------------------------------------------------ the classifier
class RuleBasedClassifier:
    """Regular expressions over the folded new part of the reply."""

    def classify(self, text: str, *, received_at: datetime) -> Classification:
        """Classify one reply."""
        body = _fold(strip_quoted(text))
        if not body:
            return Classification(label="neutral", confidence=0.3)
        if _STOP_ONLY.match(body):
            return Classification(label="unsubscribe", confidence=0.9, matched=body.strip())
        unsub, _ = _first_unnegated(UNSUBSCRIBE, body)
        if unsub:
            return Classification(label="unsubscribe", confidence=0.9, matched=unsub.group(0))
        if m := AUTO_REPLY.search(body):
            return Classification(
                label="out_of_office",
                confidence=0.9,
                matched=m.group(0),
                return_date=extract_return_date(body, received_at),
            )
        if m := NEGATIVE.search(body):
            return Classification(label="negative", confidence=0.75, matched=m.group(0))
        positive, negated_positive = _first_unnegated(POSITIVE, body)
        away = OUT_OF_OFFICE.search(body)
        if positive:
            return Classification(
                label="positive",
                confidence=0.7,
                matched=positive.group(0),
                return_date=extract_return_date(body, received_at) if away else None,
            )
        if negated_positive:
            return Classification(label="negative", confidence=0.6, matched=negated_positive.group(0))
        if away:
            return Classification(
                label="out_of_office",
                confidence=0.8,
                matched=away.group(0),
                return_date=extract_return_date(body, received_at),
            )
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
