"""A loopback SMTP server that keeps every message as an `.eml` file.

The embedded stack (`make run`) points the worker's SMTP settings here, so a developer
sees exactly what the sequences would have sent, byte for byte, without a real relay and
without any mail leaving the machine. Each accepted message becomes
`<UTC timestamp>_<sanitized Message-ID>.eml` in the mail folder and one line on stdout.

Run alone: `python -m devstack.smtp_catcher --port 2525 --dir .dev/mail`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import re
import signal
import sys
from datetime import UTC, datetime
from email.header import decode_header, make_header
from email.parser import BytesHeaderParser
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

_UNSAFE = re.compile(r"[^A-Za-z0-9._@+-]+")
_counter = itertools.count(1)


def eml_name(message_id: str | None, when: datetime) -> str:
    """File name for a message: sortable UTC timestamp plus a filesystem-safe Message-ID."""
    stamp = when.astimezone(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    mid = _UNSAFE.sub("_", (message_id or "").strip().strip("<>")).strip("._")[:120]
    return f"{stamp}_{mid or f'no-message-id-{next(_counter)}'}.eml"


def _decoded(value: str) -> str:
    """An RFC 2047 encoded header as text (for the console line only)."""
    return str(make_header(decode_header(value))) if value else ""


class MailDirHandler:
    """aiosmtpd handler that writes each message to `directory` and prints a summary."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.saved: list[Path] = []

    async def handle_DATA(  # noqa: N802 (aiosmtpd's hook name)
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        """Store the message exactly as received (plus a Return-Path/X-Rcpt-To preamble)."""
        raw = envelope.original_content or b""
        if isinstance(envelope.content, bytes) and not raw:
            raw = envelope.content
        headers = BytesHeaderParser().parsebytes(raw)  # compat32: raw header text
        now = datetime.now(UTC)
        path = self.directory / eml_name(headers.get("Message-ID"), now)
        preamble = (
            f"X-Catcher-Mail-From: {envelope.mail_from}\r\n"
            f"X-Catcher-Rcpt-To: {', '.join(envelope.rcpt_tos)}\r\n"
            f"X-Catcher-Received-At: {now.isoformat()}\r\n"
        ).encode()
        path.write_bytes(preamble + raw)
        self.saved.append(path)
        print(
            f"{now.isoformat(timespec='seconds')} mail from={envelope.mail_from} "
            f"to={','.join(envelope.rcpt_tos)} subject={_decoded(headers.get('Subject', ''))!r} "
            f"-> {path}",
            flush=True,
        )
        return "250 Message accepted for delivery"


def make_controller(directory: Path, port: int, host: str = "127.0.0.1") -> Controller:
    """A started-on-demand aiosmtpd controller (call `.start()` / `.stop()`)."""
    handler = MailDirHandler(directory)
    return Controller(handler, hostname=host, port=port, ready_timeout=10.0)


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2525)
    parser.add_argument("--dir", type=Path, default=Path(".dev/mail"))
    args = parser.parse_args(argv)
    try:
        controller = make_controller(args.dir, args.port, args.host)
        controller.start()
    except OSError as err:
        print(f"smtp catcher: cannot listen on {args.host}:{args.port}: {err}", file=sys.stderr)
        return 1
    print(f"smtp catcher listening on {args.host}:{args.port}, writing to {args.dir}", flush=True)

    stop = asyncio.Event()

    async def wait() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()

    asyncio.run(wait())
    controller.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
