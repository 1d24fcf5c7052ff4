"""The `sequencer` command line: sequences, people, segments, senders, enrollments, stats.

Every command talks to PostgreSQL and Temporal through the same settings as the
worker. Errors are reported as one clear line (or a list naming each problem) with a
non-zero exit code; nothing is half-written.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from db.session import SessionFactory, make_engine, make_session_factory
from settings import InsecureSettingsError, check_settings, get_settings

app = typer.Typer(help="Sequencer: outreach sequences as durable Temporal workflows.", no_args_is_help=True)
sequences_app = typer.Typer(help="Validate and version sequence files.", no_args_is_help=True)
people_app = typer.Typer(help="Import people and their identities.", no_args_is_help=True)
segments_app = typer.Typer(help="Audiences: static snapshots and rule-based segments.", no_args_is_help=True)
senders_app = typer.Typer(help="Sending accounts and their caps.", no_args_is_help=True)
app.add_typer(sequences_app, name="sequences")
app.add_typer(people_app, name="people")
app.add_typer(segments_app, name="segments")
app.add_typer(senders_app, name="senders")

console = Console()
err = Console(stderr=True)
T = TypeVar("T")


@app.callback()
def _refuse_unsafe_settings(ctx: typer.Context) -> None:
    """Sequencer: outreach sequences as durable Temporal workflows."""
    if ctx.resilient_parsing or "--help" in sys.argv[1:]:
        return
    try:
        check_settings(get_settings(), "the sequencer CLI")
    except InsecureSettingsError as refused:
        err.print(f"[red]error:[/red] {escape(str(refused))}", soft_wrap=True)
        raise typer.Exit(2) from None


def _run(fn: Callable[[SessionFactory], Awaitable[T]]) -> T:
    async def inner() -> T:
        engine = make_engine(get_settings().database_url, pool_size=5)
        try:
            return await fn(make_session_factory(engine))
        finally:
            await engine.dispose()

    from models.sequence_checks import SequenceValidationError

    try:
        return asyncio.run(inner())
    except SequenceValidationError:
        raise  # the caller lists every issue
    except (LookupError, ValueError) as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    except OSError as exc:
        err.print(f"[red]cannot connect:[/red] {exc} (is `make run` up? DATABASE_URL / TEMPORAL_ADDRESS)")
        raise typer.Exit(3) from None


# ---------------------------------------------------------------------- sequences
@sequences_app.command("validate")
def sequences_validate(file: Path = typer.Argument(..., exists=True, dir_okay=False)) -> None:
    """Check a sequence file; print every problem with its step and rule."""
    from models.sequence_checks import SequenceValidationError
    from services.sequence_store import validate_file

    try:
        defn = validate_file(file)
    except SequenceValidationError as exc:
        _print_issues(file, exc)
        raise typer.Exit(1) from None
    console.print(f"[green]ok[/green] {file}: sequence {defn.name!r}, {len(defn.steps)} steps")


def _print_issues(file: Path, exc: Any) -> None:
    err.print(f"[red]{escape(str(file))}: {len(exc.issues)} problem(s)[/red]", soft_wrap=True)
    for issue in exc.issues:
        err.print(f"  - {escape(str(issue))}", soft_wrap=True, highlight=False)


@sequences_app.command("create")
def sequences_create(file: Path = typer.Argument(..., exists=True, dir_okay=False)) -> None:
    """Store a new immutable version (the same content gives the same version)."""
    from models.sequence_checks import SequenceValidationError
    from services.sequence_store import create_version

    async def go(sf: SessionFactory) -> Any:
        return await create_version(sf, file)

    try:
        created = _run(go)
    except SequenceValidationError as exc:
        _print_issues(file, exc)
        raise typer.Exit(1) from None
    word = "created" if created.created else "unchanged, existing"
    console.print(f"sequence {created.name!r}: {word} version {created.version}")


# ---------------------------------------------------------------------- people
@people_app.command("import")
def people_import(
    file: Path = typer.Argument(..., exists=True, dir_okay=False),
    segment: str = typer.Option(..., "--segment", help="static segment to snapshot the rows into"),
) -> None:
    """Upsert people and identities from a CSV; bad rows are reported by line, good rows land."""
    from services.people_import import import_people

    with file.open(encoding="utf-8", errors="replace") as handle:
        total_lines = max(0, sum(1 for _ in handle) - 1)
    with Progress(TextColumn("importing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err) as bar:
        task = bar.add_task("rows", total=total_lines)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total or total_lines)

        async def go(sf: SessionFactory) -> Any:
            return await import_people(sf, file, segment, progress=progress)

        report = _run(go)
    console.print(
        f"{report.rows} rows: {report.created} created, {report.updated} updated, "
        f"{report.unchanged} unchanged, {len(report.errors)} bad; "
        f"segment {segment!r} has {report.members} people"
        + (f" ({report.suppressed} suppressed: they will not be contacted)" if report.suppressed else "")
    )
    for row_error in report.errors:
        err.print(f"  line {row_error.line}: {escape(row_error.reason)}", soft_wrap=True, highlight=False)
    if report.errors:
        raise typer.Exit(1)


# ---------------------------------------------------------------------- segments
@segments_app.command("create")
def segments_create(
    name: str = typer.Argument(...),
    where: str = typer.Option(..., "--where", help="e.g. company = 'Acme' and (role in ('CEO','CTO'))"),
) -> None:
    """Store a rule-based segment (a changed rule makes a new version)."""
    from services.segment_rules import RuleSyntaxError, parse_rule
    from services.segments import create_rule_segment

    try:
        parse_rule(where)  # a syntax error is reported (exit 1) before anything connects
    except RuleSyntaxError as exc:
        err.print(f"[red]--where:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from None

    async def go(sf: SessionFactory) -> Any:
        return await create_rule_segment(sf, name, where)

    seg = _run(go)
    console.print(f"segment {name!r} version {seg.version}: {seg.size} people match now")


# ---------------------------------------------------------------------- senders
@senders_app.command("add")
def senders_add(
    channel: str = typer.Option(..., "--channel", help="email, x, linkedin or xmtp"),
    address: str = typer.Option(..., "--address"),
    per_hour: int | None = typer.Option(None, "--per-hour"),
    per_day: int | None = typer.Option(None, "--per-day"),
    spacing: str | None = typer.Option(None, "--spacing", help="minimum gap, e.g. 60s"),
    jitter: str | None = typer.Option(None, "--jitter", help="random extra gap, e.g. 30s"),
    warmup_start: int | None = typer.Option(None, "--warmup-start", help="per-day cap on day 1"),
    warmup_days: int = typer.Option(0, "--warmup-days"),
    timezone: str = typer.Option("UTC", "--timezone", help="the sender's day resets at its local midnight"),
    name: str | None = typer.Option(None, "--name", help="display name"),
    smtp: str | None = typer.Option(
        None, "--smtp", help="own SMTP: smtps://user:pass@host:465 or smtp://user@host:587?starttls=true"
    ),
    imap: str | None = typer.Option(None, "--imap", help="own mailbox: imaps://user:pass@host:993/INBOX"),
    smtp_password_env: str | None = typer.Option(
        None, "--smtp-password-env", help="read the SMTP password from this environment variable"
    ),
    imap_password_env: str | None = typer.Option(
        None, "--imap-password-env", help="read the IMAP password from this environment variable"
    ),
    oauth_refresh_token_env: str | None = typer.Option(
        None, "--oauth-refresh-token-env", help="XOAUTH2: the OAuth refresh token's environment variable"
    ),
    oauth_client_id: str | None = typer.Option(None, "--oauth-client-id", help="default: OAUTH_CLIENT_ID"),
    oauth_client_secret_env: str | None = typer.Option(
        None, "--oauth-client-secret-env", help="default: OAUTH_CLIENT_SECRET"
    ),
    oauth_token_url: str | None = typer.Option(
        None, "--oauth-token-url", help="google, microsoft or a URL (default: OAUTH_TOKEN_URL)"
    ),
    oauth_scope: str | None = typer.Option(None, "--oauth-scope", help="scopes to ask for (Microsoft needs them)"),
    no_smtp: bool = typer.Option(False, "--no-smtp", help="remove the own SMTP (back to the global relay)"),
    no_imap: bool = typer.Option(False, "--no-imap", help="remove the mailbox connection"),
) -> None:
    """Add (or update) a sending account: caps, spacing, jitter, and its own SMTP/IMAP."""
    import os

    from models.durations import parse_duration
    from services.mail_urls import MailUrlError, connection_flags
    from services.senders import add_sender

    try:
        flags = connection_flags(
            os.environ,
            smtp=smtp,
            imap=imap,
            smtp_password_env=smtp_password_env,
            imap_password_env=imap_password_env,
            oauth_refresh_token_env=oauth_refresh_token_env,
            oauth_client_id=oauth_client_id,
            oauth_client_secret_env=oauth_client_secret_env,
            oauth_token_url=oauth_token_url,
            oauth_scope=oauth_scope,
            no_smtp=no_smtp,
            no_imap=no_imap,
        )
    except MailUrlError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None

    async def go(sf: SessionFactory) -> Any:
        return await add_sender(
            sf,
            channel=channel,
            address=address,
            per_hour=per_hour,
            per_day=per_day,
            spacing=parse_duration(spacing).total_seconds() if spacing else None,
            jitter=parse_duration(jitter).total_seconds() if jitter else None,
            warmup_start_per_day=warmup_start,
            warmup_days=warmup_days,
            timezone=timezone,
            display_name=name,
            smtp=flags.smtp,
            imap=flags.imap,
            oauth=flags.oauth,
            remove=flags.remove,
            settings=get_settings(),
        )

    acct = _run(go)
    console.print(
        f"sender {acct.channel}:{acct.address} (id {acct.id}): {acct.per_hour}/h, {acct.per_day}/day, "
        f"spacing {acct.min_spacing_seconds:g}s + jitter {acct.jitter_seconds:g}s"
    )
    for url in (flags.smtp, flags.imap):
        if url is not None:
            console.print(f"  {url.kind}: {escape(url.display())} ({url.auth}); check it with `senders test {acct.id}`")
    for kind in sorted(flags.remove):
        console.print(f"  {kind}: removed")
    if flags.imap is not None and acct.channel == "email":
        sender_id = int(acct.id)

        async def watch(sf: SessionFactory) -> list[str]:
            return await _start_watchers(sf, get_settings(), sender_id)

        for line in _run(watch):
            console.print(line)


@senders_app.command("list")
def senders_list(channel: str | None = typer.Option(None, "--channel")) -> None:
    """Every sender with its caps and connections (secrets are never shown)."""
    from services.mail_urls import MailUrl
    from services.sender_breaker import describe as describe_breaker
    from services.senders import list_senders

    views = _run(lambda sf: list_senders(sf, channel))
    if not views:
        console.print("no senders yet: add one with `senders add`")
        return
    settings = get_settings()
    table = Table(show_lines=False)
    for column in ("id", "channel", "address", "caps", "smtp", "imap", "status"):
        table.add_column(column, overflow="fold")
    for view in views:
        acct = view.account
        cells: dict[str, str] = {}
        status: list[str] = []
        for kind in ("smtp", "imap"):
            row = view.connections.get(kind)
            if row is None:
                if acct.channel != "email":
                    cells[kind] = ""
                elif kind == "smtp":
                    cells[kind] = f"global relay {settings.smtp_host}:{settings.smtp_port}"
                else:
                    cells[kind] = "-"
                continue
            url = MailUrl(
                kind="imap" if kind == "imap" else "smtp",
                host=row.host,
                port=row.port,
                security=row.security,  # type: ignore[arg-type]
                username=row.username,
                auth=row.auth,  # type: ignore[arg-type]
                folder=row.folder,
            )
            cells[kind] = f"{url.display()} ({row.auth})"
            if row.status:
                when = f" at {row.status_at:%Y-%m-%d %H:%M}" if row.status_at else ""
                status.append(f"{kind} {row.status}{when}" + (f": {row.status_reason}" if row.status_reason else ""))
        if not acct.active:
            status.insert(0, "inactive")
        if acct.paused_at is not None:
            status.insert(0, describe_breaker(acct))
        if acct.dkim_selector:
            status.append(f"DKIM-signed as {acct.dkim_selector}._domainkey.{acct.dkim_domain}")
        table.add_row(
            str(acct.id),
            acct.channel,
            escape(acct.address),
            f"{acct.per_hour}/h {acct.per_day}/day",
            escape(cells["smtp"]),
            escape(cells["imap"]),
            escape("; ".join(status) or "-"),
        )
    console.print(table)


@senders_app.command("pause")
def senders_pause(
    sender_id: int = typer.Argument(..., help="the sender's id (see `senders list`)"),
    reason: str = typer.Option("paused by hand", "--reason"),
) -> None:
    """Hold a sender: no slots are granted to it and its leads wait until `senders resume`."""
    from services.sender_breaker import describe, set_paused

    acct = _run(lambda sf: set_paused(sf, sender_id, reason, datetime.now(UTC)))
    console.print(f"sender {acct.id} ({escape(acct.address)}): {escape(describe(acct))}")


@senders_app.command("resume")
def senders_resume(sender_id: int = typer.Argument(..., help="the sender's id (see `senders list`)")) -> None:
    """Close the sender's circuit breaker (auth, bounce rate, throttling or a manual pause): its leads go on."""
    from services.sender_breaker import resume

    acct = _run(lambda sf: resume(sf, sender_id, datetime.now(UTC)))
    console.print(f"sender {acct.id} ({escape(acct.address)}) resumed: its waiting leads go on")


@senders_app.command("test")
def senders_test(sender_id: int = typer.Argument(..., help="the sender's id (see `senders list`)")) -> None:
    """Check a sender's SMTP login, IMAP login, IDLE support and folder; say why not."""
    from services.mailbox_login import check_sender

    results = _run(lambda sf: check_sender(sf, get_settings(), sender_id))
    for result in results:
        mark = (
            "[red]FAIL[/red]"
            if not result.ok
            else ("[yellow]warn[/yellow]" if result.warning else "[green]ok  [/green]")
        )
        console.print(f"{mark} {result.name}: {escape(result.detail)}", soft_wrap=True)
    if not all(r.ok for r in results):
        raise typer.Exit(1)


@senders_app.command("dkim")
def senders_dkim(
    sender_id: int = typer.Argument(..., help="the email sender's id (see `senders list`)"),
    selector: str | None = typer.Option(None, "--selector", help="the DKIM selector, e.g. s1"),
    key_file: Path | None = typer.Option(
        None, "--key-file", dir_okay=False, help="PEM RSA private key (openssl genrsa -out dkim.pem 2048)"
    ),
    domain: str | None = typer.Option(None, "--domain", help="signing domain d= (default: the From domain)"),
    clear: bool = typer.Option(False, "--clear", help="stop signing for this sender"),
) -> None:
    """Sign a sender's email with DKIM (key stored encrypted with SECRETS_KEY); print the DNS record."""
    from services import sender_dkim
    from services.secret_box import SecretBox, SecretKeyError

    if clear:
        _run(lambda sf: sender_dkim.clear_sender_dkim(sf, sender_id))
        console.print(f"sender {sender_id}: Sequencer no longer signs its email (remove the DNS record when unused)")
        return
    if (selector is None) != (key_file is None):
        err.print("[red]error:[/red] --selector and --key-file go together (or neither, to show the DNS record)")
        raise typer.Exit(2)
    try:
        box = SecretBox.from_settings(get_settings())
        pem = key_file.read_text(encoding="ascii") if key_file is not None else ""
    except (SecretKeyError, OSError, UnicodeDecodeError) as exc:
        reason = "--key-file: not PEM text" if isinstance(exc, UnicodeDecodeError) else str(exc)
        err.print(f"[red]error:[/red] {escape(reason)}")
        raise typer.Exit(2) from None
    record: sender_dkim.DkimRecord | None
    if selector is not None:
        record = _run(
            lambda sf: sender_dkim.set_sender_dkim(
                sf, box, sender_id, selector=selector, private_key_pem=pem, domain=domain
            )
        )
    else:
        record = _run(lambda sf: sender_dkim.sender_dkim_record(sf, box, sender_id))
    if record is None:
        console.print(f"sender {sender_id}: not signed by Sequencer; add a key with --selector and --key-file")
        return
    chunks = " ".join(f'"{record.txt[i : i + 255]}"' for i in range(0, len(record.txt), 255))
    console.print(f"sender {sender_id} signs as d={record.domain} s={record.selector} (RSA {record.bits} bits)")
    console.print("publish this DNS TXT record (long values are split into 255-character strings):", soft_wrap=True)
    console.print(f"  {record.name}. IN TXT {chunks}", soft_wrap=True, markup=False)
    if not record.aligned:
        console.print(
            f"[yellow]warning:[/yellow] d={record.domain} is not the From domain or a parent of it: "
            "DMARC will not count this signature as aligned",
            soft_wrap=True,
        )


# ---------------------------------------------------------------------- enroll
@app.command("enroll")
def enroll(
    sequence: str = typer.Option(..., "--sequence"),
    segment: str = typer.Option(..., "--segment"),
    dry_run: bool = typer.Option(False, "--dry-run", help="render every first message; send nothing"),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="show progress until every start is done"),
    page_size: int = typer.Option(500, "--page-size"),
) -> None:
    """Start one enrollment per person of the segment, durably, for any size."""
    if dry_run:
        _dry_run(sequence, segment)
        return
    from operations.enrolling import start_audience

    async def go(sf: SessionFactory) -> Any:
        return await start_audience(
            sf, get_settings(), sequence, segment, page_size=page_size, wait=wait, on_progress=_progress_printer()
        )

    progress = _run(go)
    if progress is None:
        console.print("audience enrollment started in the background (see the Web UI)")
        return
    console.print(
        f"enrolled {progress.started}, already enrolled {progress.already}, refused {progress.refused}"
        + (f" of {progress.total}" if progress.total is not None else "")
    )
    for refusal in progress.refusals[:20]:
        err.print(f"  refused: {escape(refusal)}", soft_wrap=True, highlight=False)


def _progress_printer() -> Callable[[Any], None]:
    bar = Progress(TextColumn("enrolling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err)
    task = bar.add_task("enroll", total=None)
    state = {"started": False}

    def update(p: Any) -> None:
        if not state["started"]:
            bar.start()
            state["started"] = True
        bar.update(task, completed=p.started + p.already + p.refused, total=p.total)
        if p.done:
            bar.stop()

    return update


def _dry_run(sequence: str, segment: str) -> None:
    from operations.enrolling import dry_run

    async def go(sf: SessionFactory) -> Any:
        return await dry_run(sf, sequence, segment)

    report = _run(go)
    table = Table(title=f"dry run: {sequence} -> {segment} (nothing sent)")
    for col in ("person", "step", "variant", "to", "subject / text"):
        table.add_column(col)
    for item in report.previews[:20]:
        table.add_row(str(item.person_id), item.step, item.variant or "", item.to or "", item.preview)
    console.print(table)
    console.print(
        f"{report.people} people, {len(report.previews)} messages rendered, "
        f"{len(report.problems)} problems, {len(report.warnings)} warnings"
    )
    for problem in report.problems:
        err.print(f"  [red]problem[/red] {escape(problem)}", highlight=False, soft_wrap=True)
    for warning in report.warnings:
        err.print(f"  [yellow]warning[/yellow] {escape(warning)}", highlight=False, soft_wrap=True)
    if report.problems:
        raise typer.Exit(1)


# ---------------------------------------------------------------------- control
def _control(kind: str, sequence: str, person: int | None, reason: str) -> None:
    from operations.control import signal_enrollments

    async def go(sf: SessionFactory) -> Any:
        return await signal_enrollments(get_settings(), kind, sequence, person, reason, session_factory=sf)

    count = _run(go)
    console.print(f"{kind}: signalled {count} enrollment(s) of {sequence!r}")


@app.command("pause")
def pause(
    sequence: str = typer.Option(..., "--sequence"),
    person: int | None = typer.Option(None, "--person"),
    reason: str = typer.Option("", "--reason"),
) -> None:
    """Hold enrollments where they are (timers stop; nothing is skipped)."""
    _control("pause", sequence, person, reason)


@app.command("resume")
def resume(
    sequence: str = typer.Option(..., "--sequence"),
    person: int | None = typer.Option(None, "--person"),
    reason: str = typer.Option("", "--reason"),
) -> None:
    """Continue paused enrollments."""
    _control("resume", sequence, person, reason)


@app.command("stop")
def stop(
    sequence: str = typer.Option(..., "--sequence"),
    person: int | None = typer.Option(None, "--person"),
    reason: str = typer.Option("", "--reason"),
) -> None:
    """End enrollments now."""
    _control("stop", sequence, person, reason)


@app.command("status")
def status(person: int = typer.Option(..., "--person")) -> None:
    """Where that person is in each sequence, what it waits for, until when."""
    from operations.control import person_status

    async def go(sf: SessionFactory) -> Any:
        from sqlalchemy import func, select

        from db.tables import Event
        from models.outcomes import EventType

        async with sf() as session:
            query = select(func.count()).where(Event.person_id == person, Event.type == EventType.REPLY_UNVERIFIED)
            unverified = int((await session.execute(query)).scalar_one())
        return await person_status(sf, get_settings(), person), unverified

    rows, unverified = _run(go)
    if unverified:
        console.print(
            f"{unverified} repl{'y' if unverified == 1 else 'ies'} matched to person {person} only by thread "
            "headers, from an address that is not theirs: recorded, not acted on (events `reply_unverified`)"
        )
    if not rows:
        console.print(f"person {person} has no enrollments")
        return
    table = Table(title=f"person {person}")
    for col in ("sequence", "version", "status", "step", "waiting for", "until", "variants", "path", "last delivery"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r.sequence,
            str(r.version),
            r.status,
            r.current_step or "",
            ", ".join(r.waiting_for),
            r.until.isoformat() if r.until else "",
            ", ".join(f"{k}={v}" for k, v in r.variants.items()),
            " > ".join(r.path),
            r.last_delivery or "",
        )
    console.print(table)
    _print_paused_senders()


def _print_paused_senders() -> None:
    """Senders the circuit breaker holds (their leads wait), with the reason."""
    from services.sender_breaker import describe, paused_senders

    async def go(sf: SessionFactory) -> list[str]:
        async with sf() as session:
            return [
                f"sender {a.id} {a.channel} {a.address}: {describe(a)}"
                for a in await paused_senders(session, datetime.now(UTC))
            ]

    for line in _run(go):
        console.print(f"[yellow]{escape(line)}[/yellow] (leads wait; `senders resume` lets them go on)", soft_wrap=True)


@app.command("stats")
def stats(
    sequence: str = typer.Option(..., "--sequence"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Funnel per version, step and variant; campaign counters."""
    from services.stats import FUNNEL, sequence_stats

    async def go(sf: SessionFactory) -> Any:
        return await sequence_stats(sf, sequence)

    result = _run(go)
    if as_json:
        sys.stdout.write(json.dumps(result.model_dump(mode="json"), indent=2) + "\n")
        return
    table = Table(title=f"{sequence}: funnel")
    for col in ("version", "step", "variant", *FUNNEL):
        table.add_column(col, justify="right" if col in FUNNEL else "left")
    for row in result.rows:
        table.add_row(
            str(row.version), row.step or "(sequence)", row.variant or "", *(str(row.counts[c]) for c in FUNNEL)
        )
    table.add_row("all", "", "", *(str(result.totals[c]) for c in FUNNEL), style="bold")
    console.print(table)
    c = result.campaign
    console.print(
        f"campaign: total {c.total}, pending {c.pending}, queued {c.queued}, sent {c.sent}, "
        f"failed {c.failed}, bounced {c.bounced}, uncertain {c.uncertain}"
    )


@app.command("demo")
def demo() -> None:
    """Load the demo (examples/): sequence, people, senders, and enroll them (idempotent)."""
    from operations.demo import load_demo

    async def go(sf: SessionFactory) -> Any:
        settings = get_settings()
        lines = await load_demo(sf, settings)
        return lines + await _start_watchers(sf, settings)

    for line in _run(go):
        console.print(line)


async def _start_watchers(sf: SessionFactory, settings: Any, sender_id: int | None = None) -> list[str]:
    """Start the mailbox watcher(s) (idempotent); a line saying what happened."""
    from operations.mailbox_watchers import start_all_watchers, start_watcher
    from temporal_client import connect

    try:
        client = await connect(settings)
    except Exception as exc:  # the worker starts every watcher when it starts
        return [f"mailbox watchers: Temporal not reachable ({exc.__class__.__name__}); the worker starts them"]
    if sender_id is not None:
        _, new = await start_watcher(client, sender_id, settings.temporal_task_queue)
        return [f"  mailbox watcher for sender {sender_id}: {'started' if new else 'already running'}"]
    started = await start_all_watchers(client, sf, settings.temporal_task_queue)
    return [f"mailbox watchers started for senders {started}" if started else "mailbox watchers: already running"]


@app.command("reply")
def reply(
    person: int = typer.Option(..., "--person"),
    channel: str = typer.Option("email", "--channel", help="email, x, linkedin or xmtp"),
    text: str = typer.Option("Sounds good, let's talk", "--text"),
    type_: str = typer.Option("reply", "--type", help="reply, connection_accepted, followed_back, ..."),
    via: str = typer.Option(
        "auto", "--via", help="email: imap (append to the sender's mailbox), webhook, or auto (imap when it can)"
    ),
) -> None:
    """Reply as a person: for email an RFC 5322 reply appended to the sender's mailbox (IMAP),
    threaded under their last email; otherwise a signed inbound event posted to the webhook app."""
    import time
    import uuid

    import httpx
    from sqlalchemy import select

    from db.tables import Identity
    from webhooks.signature import sign

    wanted = {"email": ["email"], "x": ["x", "x_handle"], "linkedin": ["linkedin"], "xmtp": ["xmtp"]}
    if channel not in wanted:
        err.print(f"[red]--channel:[/red] unknown channel {channel!r}")
        raise typer.Exit(2)
    if via not in ("auto", "imap", "webhook"):
        err.print(f"[red]--via:[/red] {via!r}: use imap, webhook or auto")
        raise typer.Exit(2)
    if channel == "email" and type_ == "reply" and via != "webhook":
        from services.reply_mail import ReplyError, append_reply

        async def by_mail(sf: SessionFactory) -> Any:
            try:
                return await append_reply(sf, get_settings(), person, text)
            except ReplyError as exc:
                return exc

        appended = _run(by_mail)
        if not isinstance(appended, Exception):
            console.print(
                f"reply {appended.message_id} appended to {appended.mailbox} (sender {appended.sender_id}), "
                f"threaded under {appended.in_reply_to}; the mailbox watcher picks it up"
            )
            return
        if via == "imap":
            err.print(f"[red]error:[/red] {escape(str(appended))}", soft_wrap=True)
            raise typer.Exit(1)
        console.print(f"not by IMAP ({escape(str(appended))}): posting to the webhook instead")

    async def go(sf: SessionFactory) -> Any:
        async with sf() as session:
            rows = (
                await session.execute(
                    select(Identity.channel, Identity.value).where(
                        Identity.person_id == person, Identity.channel.in_(wanted[channel])
                    )
                )
            ).all()
        if not rows:
            raise LookupError(f"person {person} has no {channel} identity")
        settings = get_settings()
        body = json.dumps(
            {"event_id": f"cli-{uuid.uuid4().hex}", "type": type_, "from": rows[0][1], "text": text}
        ).encode()
        signature = sign(settings.webhook_keys(channel)[0], body, int(time.time()), channel=channel)
        async with httpx.AsyncClient(base_url=settings.public_base_url, timeout=10) as http:
            return await http.post(
                f"/webhooks/{channel}",
                content=body,
                headers={"X-Signature": signature, "Content-Type": "application/json"},
            )

    response = _run(go)
    console.print(f"{response.status_code} {response.text}")
    if response.status_code >= 300:
        raise typer.Exit(1)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
