"""Each benchmark is its own module in bench/ with an async `run(stack, args, tmp)`-style entry
registered in BENCHMARKS below; shared helpers live in bench/common.py.

Benchmarks: the engine against a baseline measured in the same run, on the same servers.

`make bench` (or `python -m bench.run [--people 5000] [--only NAME]`) starts a
throwaway stack (bench/stack.py), runs each benchmark, prints the figures and ratios,
and appends them with the date and machine to bench/RESULTS.md. Nothing here asserts
a time: the targets are printed next to the ratios for a person to judge.

Each benchmark is its own module in bench/ with an async `run(stack, args, tmp)`-style entry
registered in BENCHMARKS below; shared helpers live in bench/common.py.

Benchmarks:
- enroll: audience enrollment (the audience workflow and its activity) vs raw no-op
  workflow starts; target >= 0.8x.
- reaction: reply signal to branch taken (p50/p99) vs a bare signal round trip;
  target p99 <= 1.5x.
- send: engine email throughput to an SMTP sink with caps off vs raw pooled
  aiosmtplib sends to the same sink.
- governed: slots granted by the governor for one capped sender, four workers at once,
  vs the configured cap; target >= 0.95x with no rolling hour over the cap.
- webhook: signed webhook received to workflow branched (p50/p99) at 20 replies/s with
  2,000 waiting leads vs a bare signal round trip; and sends after a reply (must be 0).
- imap: reply APPENDed to the sender's mailbox (pymap, IDLE) to workflow branched (p50/p99) at
  20/s with 2,000 waiting leads vs the signed webhook in the same run; target p99 < 1 s, <= 1.5x.
- provider_batch: 1,000 signed SendGrid events in one POST (target < 1 s) vs the same
  number posted one event per request; and the replay of the batch.
- workers: the send bench with 1, 2 and 4 `python worker.py` processes on one dev server and
  one PostgreSQL, caps off (emails/s) and with the default caps (slots/s); no Message-ID twice
  at the sink, the ledger matching it, no sender or person cap exceeded across processes.
- memory: worker RSS with 1,000 and 50,000 sleeping enrollments (cache 1,000) vs every one
  cached (10,000), the dev server's start rate, RSS and SQLite size, per-enrollment costs.
- fault: a two-email campaign (--fault-leads, 300) while the real worker process is SIGKILLed
  30 times and restarted, SMTP answers 451 to 20% of messages and the Temporal dev server
  restarts once (its own servers, bench/fault.py); targets: 0 duplicates, 0 unrecorded
  losses, finished within 60 s of the last fault.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench import enroll, fault, governed, imap, memory, provider_batch, reaction, send, webhook, workers
from bench.common import RESULTS, record
from bench.stack import Stack, bench_stack

Runner = Callable[[Stack, argparse.Namespace, Path], Awaitable[dict[str, Any]]]

#: name -> how to run it; a new benchmark adds one line here (and its own module).
BENCHMARKS: dict[str, Runner] = {
    "enroll": lambda stack, args, tmp: enroll.bench_enroll(stack, args.people, tmp, args.baseline),
    "reaction": lambda stack, args, tmp: reaction.bench_reaction(stack, 400, tmp),
    "send": lambda stack, args, tmp: send.bench_send(stack, 1000, tmp),
    "governed": lambda stack, args, tmp: governed.bench_governed(stack, 600),
    "webhook": lambda stack, args, tmp: webhook.bench_webhook(stack, args.leads, 200, tmp),
    "provider_batch": lambda stack, args, tmp: provider_batch.bench_provider_batch(stack, 1000),
    "fault": lambda stack, args, tmp: fault.bench_fault(args, tmp),
    "imap": lambda stack, args, tmp: imap.bench_imap(stack, args.leads, min(200, args.leads // 4), tmp),
    "workers": lambda stack, args, tmp: workers.bench_workers(stack, 1000, tmp),
    "memory": lambda stack, args, tmp: memory.bench_memory(tmp),
}
#: Benchmarks that `make bench` runs when no --only is given.
DEFAULT = ["enroll", "reaction", "send", "governed", "webhook", "provider_batch", "fault", "imap"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of `python -m bench.run`."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--people", type=int, default=5000, help="enrollments for the enroll benchmark")
    parser.add_argument("--baseline", type=int, help="raw starts per baseline measurement (default: --people)")
    parser.add_argument(
        "--temporal-file",
        action="store_true",
        help="dev server state in a SQLite file (WAL), as `make run` keeps it, instead of in memory",
    )
    parser.add_argument("--leads", type=int, default=2000, help="waiting leads for the webhook benchmark")
    parser.add_argument("--fault-leads", type=int, default=300, help="leads for the fault run")
    parser.add_argument("--only", action="append", choices=sorted(BENCHMARKS), help="run only these")
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    return parser.parse_args(argv)


async def main(argv: list[str] | None = None) -> None:
    """Run the selected benchmarks and record them."""
    args = parse_args(argv)
    wanted = args.only or DEFAULT
    lines: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix="sequencer-bench-files-"))
    async with bench_stack(temporal_file=args.temporal_file) as stack:
        for name in wanted:
            print(f"running {name} ...", flush=True)
            result = await BENCHMARKS[name](stack, args, tmp)
            print("  " + result["line"], flush=True)
            lines.append(result["line"])
    if lines and not args.no_record:
        record(lines)
        print(f"recorded in {RESULTS}")


if __name__ == "__main__":
    asyncio.run(main())
