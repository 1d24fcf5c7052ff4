"""The demo that `make run` loads: a multi-channel sequence, people, senders, enrollment.

Idempotent: running it again changes nothing (same sequence content → same version,
re-importing the CSV changes nothing, enrolling again is a no-op that says so).
"""

from __future__ import annotations

from pathlib import Path

from db.session import SessionFactory
from operations.enrolling import start_audience
from services.people_import import import_people
from services.senders import add_sender
from services.sequence_store import create_version
from settings import Settings

ROOT = Path(__file__).resolve().parent.parent
SEQUENCE_FILE = ROOT / "examples" / "founders.yaml"
PEOPLE_FILE = ROOT / "examples" / "people.csv"
SEGMENT = "demo"
SENDERS = [
    ("email", "founder@sequencer.example", "Ada from Sequencer"),
    ("x", "1000000001", None),
    ("linkedin", "https://www.linkedin.com/in/sequencer-demo", None),
    ("xmtp", "0x" + "5e" * 20, None),
]


async def load_demo(session_factory: SessionFactory, settings: Settings) -> list[str]:
    """Create the demo sequence, people and senders, then enroll; returns report lines."""
    lines = []
    version = await create_version(session_factory, SEQUENCE_FILE)
    lines.append(
        f"sequence {version.name!r} version {version.version} ({'created' if version.created else 'already there'})"
    )
    report = await import_people(session_factory, PEOPLE_FILE, SEGMENT)
    lines.append(
        f"people: {report.created} created, {report.unchanged} unchanged, "
        f"{len(report.errors)} bad rows; segment {SEGMENT!r} has {report.members}"
    )
    lines.extend(await add_demo_senders(session_factory, settings))
    progress = await start_audience(session_factory, settings, version.name, SEGMENT)
    if progress is not None:
        lines.append(
            f"enrolled {progress.started} new, {progress.already} already enrolled, {progress.refused} refused"
        )
    return lines


async def add_demo_senders(session_factory: SessionFactory, settings: Settings) -> list[str]:
    """The demo senders; the email one watches `DEMO_IMAP_URL` when it is set.

    `make run` sets DEMO_IMAP_URL to its local IMAP server, so a reply appended to that
    mailbox travels IMAP -> watcher -> workflow; unset, the demo sender has no mailbox.
    """
    from services.mail_urls import MailUrlError, parse_mail_url

    imap = None
    if settings.demo_imap_url:
        try:
            imap = parse_mail_url(settings.demo_imap_url, kind="imap", flag="DEMO_IMAP_URL")
        except MailUrlError as err:
            raise ValueError(str(err)) from None
    for channel, address, name in SENDERS:
        await add_sender(
            session_factory,
            channel=channel,
            address=address,
            display_name=name,
            per_hour=60 if channel == "email" else 20,
            per_day=500 if channel == "email" else 100,
            spacing=5.0,
            jitter=5.0,
            imap=imap if channel == "email" else None,
            settings=settings,
        )
    lines = [f"senders: {', '.join(f'{c}:{a}' for c, a, _ in SENDERS)}"]
    if imap is not None:
        lines.append(f"mailbox: {SENDERS[0][1]} watches {imap.display()}")
    return lines
