"""How gossip messages travel: peer addresses, the HTTP transport and its handler, an in-memory network.

A transport is `async (peer, body) -> reply body` that raises on failure. `HttpTransport` posts to
`POST /mesh/peer/gossip` (signed and checked with the mesh key, `mesh.gossip.auth`: each request bound to
the receiving agent, whose binding it learns from the signed replies, or from the challenge that answers
a first contact), where `gossip_handler(gossip)` answers; `InMemoryNetwork` connects gossipers in one
process (tests, `scripts/bench_gossip_sim.py`). Anything with `handle(body) -> (status, reply)`
(`mesh.gossip.exchange.Gossip`) can answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Protocol

from aiohttp import ClientSession, web

from helexa.mesh.gossip.auth import ANY_TARGET, NONCE_HEADER, MeshAuth
from helexa.mesh.timing import MAX_GOSSIP_MESSAGE_BYTES

__all__ = [
    "GOSSIP_PATH",
    "GossipError",
    "HttpTransport",
    "InMemoryNetwork",
    "PeerAddr",
    "Responder",
    "Transport",
    "gossip_handler",
]

GOSSIP_PATH: Final = "/mesh/peer/gossip"


@dataclass(frozen=True, slots=True, order=True)
class PeerAddr:
    """Where a peer's API listens."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self}"

    @classmethod
    def parse(cls, text: str, *, default_port: int = 31313) -> PeerAddr:
        """`host:port`, `[v6]:port`, or a bare host (default port). Raises ValueError."""
        text = text.strip()
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            port = int(rest[1:]) if rest.startswith(":") else default_port
        elif text.count(":") == 1:
            host, _, p = text.partition(":")
            port = int(p)
        else:
            host, port = text, default_port
        if not host or not 0 < port < 65536:
            raise ValueError(f"bad peer address {text!r}")
        return cls(host, port)


Transport = Callable[[PeerAddr, bytes], Awaitable[bytes]]


class Responder(Protocol):
    """What answers a gossip message (`Gossip.handle`): the reply's HTTP status and body."""

    def handle(self, body: bytes) -> tuple[int, bytes]: ...


class GossipError(Exception):
    """An exchange failed (bad reply, other mesh, refused)."""


# aiohttp's default Accept, Accept-Encoding and User-Agent add ~75 B to every gossip request (~35 % of the
# headers of an open mesh) and the gossip handler reads none of them.
_SKIP_HEADERS = ("Accept", "Accept-Encoding", "User-Agent")
# Bindings remembered per peer address; forgotten all at once past this many (then relearned by challenge).
_MAX_TARGETS = 4096


class HttpTransport:
    """Posts gossip messages to `POST /mesh/peer/gossip` with aiohttp; signs and checks with a mesh key.

    With a key, each request is bound to the agent at the address (`mesh.gossip.auth`): the binding is
    learned from every signed reply; a first contact (or a peer that restarted) is answered with a signed
    challenge carrying the current binding, and the message is sent again once, bound to it."""

    def __init__(
        self, session: ClientSession, *, auth: MeshAuth | None = None, path: str = GOSSIP_PATH
    ) -> None:
        self._session = session
        self._auth = auth
        self._path = path
        self._targets: dict[PeerAddr, str] = {}

    def target(self, peer: PeerAddr) -> str:
        """The binding requests to `peer` are signed for (`*` until learned)."""
        return self._targets.get(peer, ANY_TARGET)

    def _learn(self, peer: PeerAddr, node: str) -> None:
        if len(self._targets) >= _MAX_TARGETS and peer not in self._targets:
            self._targets.clear()
        self._targets[peer] = node

    async def __call__(self, peer: PeerAddr, body: bytes) -> bytes:
        auth = self._auth
        target = self.target(peer)
        for attempt in range(2):
            headers = {"Content-Type": "application/json"}
            if auth is not None:
                headers.update(auth.sign("POST", self._path, body, target=target))
            async with self._session.post(
                f"{peer.url}{self._path}", data=body, headers=headers, skip_auto_headers=_SKIP_HEADERS
            ) as resp:
                data = await resp.content.read(MAX_GOSSIP_MESSAGE_BYTES + 1)
                if len(data) > MAX_GOSSIP_MESSAGE_BYTES:
                    raise GossipError("reply too large")
                if auth is not None and attempt == 0:
                    learned = auth.challenge(headers[NONCE_HEADER], resp.status, data, resp.headers)
                    if learned is not None and learned != target:
                        self._learn(peer, learned)
                        target = learned
                        continue
                if resp.status != 200:
                    raise GossipError(f"HTTP {resp.status}: {data[:200]!r}")
                if auth is not None:
                    self._learn(
                        peer, auth.verify_response(headers[NONCE_HEADER], resp.status, data, resp.headers)
                    )
                return data
        raise GossipError("the peer challenged a request signed for the binding it asked for")


def gossip_handler(gossip: Responder) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The aiohttp handler for `POST /mesh/peer/gossip` (authentication is the middleware's job)."""

    async def handle(request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > MAX_GOSSIP_MESSAGE_BYTES:
            return web.json_response({"type": "reject", "reason": "message too large"}, status=413)
        body = await request.read()
        status, reply = gossip.handle(body)
        return web.Response(body=reply, status=status, content_type="application/json")

    return handle


class InMemoryNetwork:
    """Gossipers in one process connected by direct calls; links can be cut (tests, simulation)."""

    def __init__(self, *, latency_s: float = 0.0) -> None:
        self.latency_s = latency_s
        self.nodes: dict[PeerAddr, Responder] = {}
        self.cut: set[PeerAddr] = set()

    def transport_for(self, src: PeerAddr) -> Transport:
        async def transport(dst: PeerAddr, body: bytes) -> bytes:
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
            target = self.nodes.get(dst)
            if target is None or src in self.cut or dst in self.cut:
                raise ConnectionRefusedError(f"{dst} unreachable")
            status, reply = target.handle(body)
            if status != 200:
                raise GossipError(f"status {status}")
            return reply

        return transport

    def add(self, addr: PeerAddr, gossip: Responder) -> None:
        self.nodes[addr] = gossip
