"""`python starter.py ...` as users run it: a subprocess against the test's database.

`cli(database_url, *args, env=...)` runs the CLI with wide, colourless output and nothing
reachable but the database (Temporal and SMTP point at closed ports unless `env` says
otherwise); its `Result` holds the exit code and the output with ANSI codes removed.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@dataclass
class Result:
    """What one CLI run answered."""

    code: int
    out: str
    err: str


async def cli(database_url: str, *args: str, env: dict[str, str] | None = None) -> Result:
    """Run `python starter.py ARGS` with the test's database (and `env` on top)."""
    full = {
        **os.environ,
        "DATABASE_URL": database_url,
        "COLUMNS": "250",
        "NO_COLOR": "1",
        "TERM": "dumb",
        # nothing here may reach a real Temporal or SMTP server
        "TEMPORAL_ADDRESS": "127.0.0.1:1",
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": "1",
        **(env or {}),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "starter.py"),
        *args,
        cwd=ROOT,
        env=full,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return Result(proc.returncode, ANSI.sub("", out.decode()), ANSI.sub("", err.decode()))
