"""Reply classification on a corpus of realistic replies (tests/data/replies.yaml).

Why: a reply's label decides a lead's course (an out-of-office reschedules instead of
branching, an unsubscribe stops everything), so every sample in four languages, with
quoted history, our footer inside the quote and signatures, must get its label and,
for out-of-office, its return date. One test id per sample.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.classify import (
    Classification,
    RuleBasedClassifier,
    extract_return_date,
    get_classifier,
    register_classifier,
    strip_quoted,
)

CORPUS = Path(__file__).parent / "data" / "replies.yaml"
SAMPLES: list[dict[str, Any]] = yaml.safe_load(CORPUS.read_text(encoding="utf-8"))["samples"]
DEFAULT_RECEIVED = datetime(2024, 11, 20, 10, 0, tzinfo=UTC)  # a Wednesday


def _received(sample: dict[str, Any]) -> datetime:
    raw = sample.get("received")
    if raw is None:
        return DEFAULT_RECEIVED
    return raw if isinstance(raw, datetime) else datetime.fromisoformat(str(raw))


def test_corpus_is_large_varied_and_labelled() -> None:
    labels = {s["label"] for s in SAMPLES}
    assert len(SAMPLES) >= 40
    assert labels == {"out_of_office", "unsubscribe", "positive", "negative", "neutral"}
    assert len({s["id"] for s in SAMPLES}) == len(SAMPLES), "sample ids must be unique"
    prefixes = {s["id"].split("_")[1] for s in SAMPLES}
    assert {"en", "de", "fr", "es"} <= prefixes
    ooo = [s for s in SAMPLES if s["label"] == "out_of_office"]
    assert all("return_date" in s for s in ooo), "every out-of-office sample states its return date (or null)"
    assert any(s["return_date"] is None for s in ooo) and any(s["return_date"] is not None for s in ooo)


@pytest.mark.parametrize("sample", SAMPLES, ids=[s["id"] for s in SAMPLES])
def test_corpus_sample(sample: dict[str, Any]) -> None:
    verdict = get_classifier().classify(sample["text"], received_at=_received(sample))
    assert verdict.label == sample["label"], f"matched {verdict.matched!r}"
    if "return_date" in sample:
        assert verdict.return_date == sample["return_date"]


@pytest.mark.parametrize(
    ("text", "received", "expected"),
    [
        ("back on 3 December", DEFAULT_RECEIVED, date(2024, 12, 3)),
        ("back on Dec 3rd", DEFAULT_RECEIVED, date(2024, 12, 3)),
        ("back on December 3, 2025", DEFAULT_RECEIVED, date(2025, 12, 3)),
        ("back on the 3rd of December", DEFAULT_RECEIVED, date(2024, 12, 3)),
        ("zurück am 03.12.", DEFAULT_RECEIVED, date(2024, 12, 3)),
        ("zurück am 3.12.25", DEFAULT_RECEIVED, date(2025, 12, 3)),
        ("de retour le 3 décembre", DEFAULT_RECEIVED, date(2024, 12, 3)),
        ("de vuelta el 3 de diciembre de 2024", DEFAULT_RECEIVED, date(2024, 12, 3)),
        # 12/3: both readings are dates; the sooner future one (3 December) wins
        ("back on 12/3", DEFAULT_RECEIVED, date(2024, 12, 3)),
        # ... and in February the sooner one is 12 March
        ("back on 12/3", datetime(2025, 2, 20, tzinfo=UTC), date(2025, 3, 12)),
        # 3/12 in November: 3 December (day/month) is sooner than 12 March
        ("back on 3/12", DEFAULT_RECEIVED, date(2024, 12, 3)),
        # only one valid reading
        ("back on 25/11", DEFAULT_RECEIVED, date(2024, 11, 25)),
        ("back on 11/25", DEFAULT_RECEIVED, date(2024, 11, 25)),
        ("back next Monday", DEFAULT_RECEIVED, date(2024, 11, 25)),
        ("back on Monday", datetime(2024, 11, 25, 8, tzinfo=UTC), date(2024, 12, 2)),  # a Monday: the next one
        ("back tomorrow", DEFAULT_RECEIVED, date(2024, 11, 21)),
        ("back next week", DEFAULT_RECEIVED, date(2024, 11, 25)),
        ("until 2024-11-29, back the week after", DEFAULT_RECEIVED, date(2024, 11, 29)),
        ("returning 5 January", datetime(2024, 12, 28, tzinfo=UTC), date(2025, 1, 5)),
        ("I was back on 18 November", DEFAULT_RECEIVED, None),  # stale: already past
        ("away for a while", DEFAULT_RECEIVED, None),
        ("away until 31/02", DEFAULT_RECEIVED, None),  # not a date
    ],
)
def test_return_date_formats(text: str, received: datetime, expected: date | None) -> None:
    assert extract_return_date(text, received) == expected


def test_quoted_history_and_signature_are_stripped() -> None:
    text = (
        "Sounds good.\n\nThanks,\nDana\n-- \nDana Kim | Contoso | unsubscribe? never\n\n"
        "On Mon, Nov 18, 2024 at 4:02 PM Sam <sam@acme.example> wrote:\n> Unsubscribe here\n"
    )
    assert strip_quoted(text) == "Sounds good.\n\nThanks,\nDana"


def test_bottom_posted_reply_keeps_the_new_text() -> None:
    text = "On Mon, Nov 18, 2024 Sam <sam@acme.example> wrote:\n> Want a demo? Unsubscribe: link\n\nYes, let's talk.\n"
    assert strip_quoted(text) == "Yes, let's talk."
    verdict = RuleBasedClassifier().classify(text, received_at=DEFAULT_RECEIVED)
    assert verdict.label == "positive"


class _AlwaysPositive:
    """A stand-in for a model-backed classifier."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, datetime]] = []

    def classify(self, text: str, *, received_at: datetime) -> Classification:
        self.seen.append((text, received_at))
        return Classification(label="positive", confidence=0.99, matched="model")


def test_pluggable_interface() -> None:
    assert isinstance(get_classifier(), RuleBasedClassifier)
    assert get_classifier("rules") is get_classifier()
    custom = _AlwaysPositive()
    register_classifier("test-always-positive", custom)
    chosen = get_classifier("test-always-positive")
    assert chosen is custom
    verdict = chosen.classify("please unsubscribe me", received_at=DEFAULT_RECEIVED)
    assert verdict.label == "positive" and custom.seen == [("please unsubscribe me", DEFAULT_RECEIVED)]
    # the default is untouched by the registration
    assert get_classifier().classify("please unsubscribe me", received_at=DEFAULT_RECEIVED).label == "unsubscribe"
    with pytest.raises(KeyError) as err:
        get_classifier("no-such-classifier")
    assert "rules" in str(err.value) and "test-always-positive" in str(err.value)
