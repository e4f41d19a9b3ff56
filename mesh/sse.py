"""Server-sent events framing, for every stream the agent sends: plain functions and one context manager.

The OpenAI streaming endpoints (`mesh.server.inference`), `/mesh/events` (`mesh.server.operator_routes`),
the proxy's error frame for a peer that died mid-stream (`mesh.routing.proxy`) and the dashboard's fake
agent (`tui.fake_agent`) all frame through here.

Frames: `event(data)` → `data: <json>\\n\\n`; `DONE` ends a successful stream; `KEEPALIVE` is a comment
line (`: keep-alive`) that clients and the openai SDK ignore but that resets their idle timers (an
`event: ping` frame with no data crashes the SDK, a comment does not); `error_event(exc)` is the last
frame of a stream that failed after it started (the SDK raises on it; a stream that just ends without
`[DONE]` looks like a normal end to it).

`keepalive(start, write, interval_s)` sends keep-alives while its body awaits something slow (a cold
load, a long prefill), starting the response lazily on the first tick, so a fast path never sends a
comment and an early failure can still get a real HTTP status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final

import orjson

from helexa.mesh.errors import HelexaError, error_envelope
from helexa.mesh.timing import SSE_KEEPALIVE_INTERVAL_S

logger = logging.getLogger(__name__)

CONTENT_TYPE: Final = "text/event-stream"
HEADERS: Final[dict[str, str]] = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    # Tell reverse proxies (nginx) not to buffer the stream.
    "X-Accel-Buffering": "no",
}
# `/mesh/events` has always been served without the charset parameter (its events are ASCII JSON).
EVENTS_HEADERS: Final[dict[str, str]] = {**HEADERS, "Content-Type": CONTENT_TYPE}


def event(data: bytes) -> bytes:
    """One `data:` event around an already-encoded JSON payload (which never contains a newline)."""
    return b"data: " + data + b"\n\n"


def comment(text: str) -> bytes:
    """A comment line: ignored by clients, but it resets their idle timers."""
    return b": " + text.encode() + b"\n\n"


DONE: Final = event(b"[DONE]")
KEEPALIVE: Final = comment("keep-alive")


def error_event(exc: HelexaError) -> bytes:
    """The final frame of a stream that failed after it started."""
    return event(orjson.dumps(error_envelope(exc)))


@contextlib.asynccontextmanager
async def keepalive(
    start: Callable[[], Awaitable[object]],
    write: Callable[[bytes], Awaitable[object]],
    interval_s: float = SSE_KEEPALIVE_INTERVAL_S,
) -> AsyncIterator[None]:
    """While the body runs, every `interval_s` call `start()` (first tick only) and write `KEEPALIVE`.

    The ticker runs in its own task so the body's awaitable (an async context manager's `__aenter__`)
    stays in the caller's task. It is stopped by an event rather than cancelled, so it never dies
    half-way through `start()`; if the client has gone, writing fails and the ticker just stops (the
    server cancels the handler, which unwinds the body).
    """
    stop = asyncio.Event()

    async def tick() -> None:
        started = False
        while True:
            try:
                await asyncio.wait_for(stop.wait(), interval_s)
                return
            except TimeoutError:
                pass
            try:
                if not started:
                    await start()
                    started = True
                await write(KEEPALIVE)
            except ConnectionError as exc:
                logger.debug("keep-alive stopped: %r", exc)
                return

    ticker = asyncio.create_task(tick(), name="sse-keepalive")
    try:
        yield
    finally:
        stop.set()
        try:
            await ticker
        except asyncio.CancelledError:
            ticker.cancel()
            raise
