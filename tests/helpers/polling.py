"""The one way the tests (and the benchmarks) wait for something to become true: `eventually`.

    await eventually(lambda: a.sees(b), what="membership")                       # 8 s, every 0.05 s
    await eventually(peer_sees_left, timeout_s=3, retry_on=(aiohttp.ClientError,))
    held_at = await eventually(converged, deadline=healed_at + 10.0, interval_s=0.2)

A check is a plain or an async callable returning something true once the condition holds. It may also
return `(ok, seen)`: `seen` is shown in the failure message (what the last look found). Exceptions of the
`retry_on` types count as "not yet" (a refused connection while an agent starts, an assertion inside the
check) and the last one is shown too; any other exception ends the wait at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["eventually"]


async def eventually(
    check: Callable[[], Any],
    *,
    timeout_s: float = 8.0,
    deadline: float | None = None,
    what: str = "",
    interval_s: float = 0.05,
    retry_on: tuple[type[BaseException], ...] = (),
    pause: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> float:
    """Poll `check()` every `interval_s` until it holds; returns the `time.monotonic()` at which it did.

    Fails with an AssertionError naming `what` (and the last thing seen) after `timeout_s`, or at
    `deadline` (a `time.monotonic()` value) when given. `pause` waits between looks (e.g. a Textual
    `pilot.pause`, which also lets the app process its messages)."""
    end = deadline if deadline is not None else time.monotonic() + timeout_s
    seen: object = None
    while True:
        try:
            result = check()
            if isinstance(result, Awaitable):
                result = await result
        except retry_on as e:
            result, seen = False, f"{type(e).__name__}: {e}"
        if isinstance(result, tuple):
            result, seen = result
        if result:
            return time.monotonic()
        if time.monotonic() > end:
            waited = timeout_s if deadline is None else None
            message = f"timed out{f' after {waited:g} s' if waited is not None else ''}: {what or check}"
            raise AssertionError(message if seen is None else f"{message}\nlast seen: {seen}")
        await pause(interval_s)
