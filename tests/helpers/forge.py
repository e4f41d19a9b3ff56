"""Forged peer traffic, as a stranger on the LAN sends it: hand-built gossip records pushed to an agent's
`POST /mesh/peer/gossip` (an open mesh needs no key for that), and a tiny stranger "agent" that records
what reaches it. The hostile-gossip scenarios (`tests/scenarios/fleet/test_hostile_gossip.py`) use them.

    stranger = await Stranger.start()                       # answers like an agent would, records requests
    await push(http, a.url, [record("evil", port=stranger.port, models=[loaded("org/m")])])
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

__all__ = ["Stranger", "loaded", "now_ms", "push", "record"]


def now_ms() -> int:
    return int(time.time() * 1000)


def loaded(model: str, *, memory_mb: int = 100) -> dict[str, object]:
    """A model record saying `model` is loaded (what makes an agent route requests there)."""
    return {"id": model, "status": "loaded", "engine": "fake", "devices": ["cpu"], "memory_mb": memory_mb}


def record(
    node_id: str,
    *,
    name: str = "stranger",
    address: str = "127.0.0.1",
    port: int = 9,
    generation: int | None = None,
    version: int = 1,
    heartbeat: int = 0,
    mesh: str = "default",
    models: Sequence[dict[str, object]] = (),
    catalogue: Sequence[dict[str, object]] = (),
    memory_mb: int = 100_000,
    **extra: object,
) -> dict[str, object]:
    """A gossip record in its wire form (`mesh.fleet.codec.node_to_dict`), every number chosen by hand."""
    return {
        "id": node_id,
        "name": name,
        "address": address,
        "port": port,
        "generation": now_ms() if generation is None else generation,
        "version": version,
        "heartbeat": heartbeat,
        "mesh": mesh,
        "agent_version": "0.1.0",
        "devices": [
            {
                "name": "cpu",
                "kind": "cpu",
                "model": "x",
                "memory_total_mb": memory_mb,
                "memory_free_mb": memory_mb,
            }
        ],
        "models": list(models),
        "catalogue": list(catalogue),
        **extra,
    }


async def push(
    http: aiohttp.ClientSession,
    url: str,
    records: Sequence[dict[str, object]],
    *,
    sender: str = "stranger",
    mesh: str = "default",
) -> tuple[int, Any]:
    """Push `records` to the agent at `url` as gossip from `sender` (unsigned: an open mesh takes it)."""
    msg = {"v": 2, "type": "push", "mesh": mesh, "from": sender, "records": list(records)}
    async with http.post(f"{url}/mesh/peer/gossip", data=orjson.dumps(msg)) as resp:
        return resp.status, await resp.json(content_type=None)


class Stranger:
    """A host that is not an agent of the mesh but answers on the peer API as if it were one: every
    request is recorded (path, headers, body); inference gets a canned answer from the stranger."""

    ANSWER = "the stranger's answer"

    def __init__(self, server: TestServer) -> None:
        self.server = server
        self.requests: list[tuple[str, dict[str, str], bytes]] = []

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port

    @classmethod
    async def start(cls) -> Stranger:
        app = web.Application()
        holder: list[Stranger] = []

        async def handle(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            holder[0].requests.append((request.path, dict(request.headers), body))
            if request.path.endswith("/completions"):
                return web.json_response(
                    {
                        "id": "chatcmpl-stranger",
                        "object": "chat.completion",
                        "created": 0,
                        "model": "org/m",
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": cls.ANSWER},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    }
                )
            return web.json_response({"type": "ok", "mesh": "default", "from": "stranger", "v": 2})

        app.router.add_route("*", "/{tail:.*}", handle)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        stranger = cls(server)
        holder.append(stranger)
        return stranger

    def received(self, needle: bytes) -> bool:
        """Whether any request (headers or body) carried `needle`."""
        for _path, headers, body in self.requests:
            if needle in body or any(needle.decode(errors="replace") in v for v in headers.values()):
                return True
        return False

    async def close(self) -> None:
        await self.server.close()
