"""One way to wait for something that is not a timer: readiness and eventual consistency.

Tests never sleep to let a durable timer pass (they skip time). What they do wait for is
another process or thread catching up: a server that finished starting, a row an activity
wrote, Temporal's visibility. `eventually()` polls such a condition with a bounded number of
tries and fails naming what never happened and the last value seen.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")

__all__ = ["eventually"]


@overload
async def eventually(check: Callable[[], Awaitable[T]], what: str, *, tries: int = ..., interval: float = ...) -> T: ...


@overload
async def eventually(check: Callable[[], T], what: str, *, tries: int = ..., interval: float = ...) -> T: ...


async def eventually(check: Callable[[], Any], what: str, *, tries: int = 500, interval: float = 0.02) -> Any:
    """Call `check` until it returns something truthy; that value, or AssertionError naming `what`."""
    last: Any = None
    for _ in range(tries):
        result = check()
        last = await result if inspect.isawaitable(result) else result
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"never: {what} (last seen: {last!r})")
