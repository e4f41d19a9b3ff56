"""A stand-in for the MLC worker process: speaks the real protocol through `engine.mlc_engine.serve`.

Prompts steer it: a last message "crash" kills the process mid-stream, "slow" emits a token every
50 ms for a long time (for abort tests), "noise" prints junk to stdout first (which must not reach the
protocol stream). A model named "missing" fails to load with a source error.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Mapping
from typing import Any

from helexa.engine.mlc_engine import WorkerRequestError, serve


class FakeBackend:
    async def load(self, message: Mapping[str, Any], report: Any) -> dict[str, Any]:
        report("loading", 0.5)
        if message["model"] == "missing":
            error = FileNotFoundError(f"no weights at {message['model']}")
            error.kind = "source"  # type: ignore[attr-defined]
            raise error
        n = int(message["tensor_parallel_shards"])
        if message["device"] == "cpu":
            return {"memory_mb": {"cpu": 50}, "context_length": 64}
        return {"memory_mb": {f"cuda:{i}": 100 + i for i in range(n)}, "context_length": 64}

    async def generate(self, message: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        text = message["messages"][-1]["content"] if "messages" in message else message["prompt"]
        words = text.split()
        if len(words) > 60:
            raise WorkerRequestError("prompt too long", kind="context", param="messages")
        if text == "noise":
            print("junk on stdout", flush=True)
            os.write(1, b"more junk\n")
        if text == "crash":
            yield {"ev": "delta", "text": "about to"}
            await asyncio.sleep(0.05)
            os._exit(3)
        if text == "slow":
            for i in range(10_000):
                await asyncio.sleep(0.05)
                yield {"ev": "delta", "text": f" {i}"}
        limit = message["sampling"]["max_tokens"] or len(words)
        for i, word in enumerate(words[:limit]):
            yield {"ev": "delta", "text": word if i == 0 else " " + word}
        yield {
            "ev": "final",
            "finish_reason": "length" if limit < len(words) else "stop",
            "prompt_tokens": len(words),
            "completion_tokens": min(limit, len(words)),
        }

    async def terminate(self) -> None:
        pass


if __name__ == "__main__":
    serve(FakeBackend())
