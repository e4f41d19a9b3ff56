"""The `FORWARDER` of the HTTP edge: serve a `RemoteDecision` by forwarding to the peer it names.

    app[FORWARDER] = Forwarder(session=lambda: http, auth=..., fleet=..., cortex=...)   # mesh.assembly

The request goes to the peer's `/mesh/peer<original path>` (signed for that peer's node id and generation
when there is a key) with `X-Helexa-Forwarded: 1`, so the target serves it locally and never routes it
again: it cold-loads if needed (its own single-flight joins concurrent loads) and streams keep-alive
comments while loading; a non-streamed request asks for a deferred answer (keep-alive spaces, then the
answer: `mesh.routing.peer_client`). `mesh.routing.proxy.forward` passes the bytes through with connect,
response-start and stall timeouts, never a total one, and a client that goes away closes the upstream
connection, which cancels the work there.

Failures:
- the peer cannot be reached, or starts no response within `start_timeout_s` (frozen, wedged, gone:
  nothing has reached the client yet): it is avoided in routing (`Fleet.avoid`) and the next candidate
  is tried; once the list is exhausted the request is routed once more over what is left (the model may
  be loaded elsewhere, or fit on this node);
- the peer refuses (503 with code `no_room` or `node_draining`): the next candidate;
- the peer refuses this agent's credentials (401: another mesh key, or other client keys): avoided, the
  next candidate (the client never sees a peer's 401);
- the peer fails after its response began but before anything reached the client: 502 (the request may
  have run there: never retried), peer avoided;
- the peer dies mid-stream: the client gets a final `data: {"error": ...}` event at once (the proxy), and
  the peer is avoided so the next request goes elsewhere without waiting for the failure detector.

Client credentials never leave this agent: the proxy drops the client's `Authorization`. With a mesh key,
the request is authenticated as a peer's and the serving agent waives client keys (the entry agent
checked them). On an open mesh with client API keys, peers authenticate with a key derived from the key
set (`mesh.gossip.auth.MeshAuth.for_client_keys`), and this agent forwards a request only to a peer that
has first proved it holds that key (`prove_members`: a signed hello, once per peer and run), so a
stranger's forged gossip record never receives a client's request; on an open mesh without client keys
anyone may serve and be served, as documented.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import aiohttp
import orjson
from aiohttp import web

from helexa.mesh import errors
from helexa.mesh.fleet.records import NodeId, NodeRecord
from helexa.mesh.fleet.view import Fleet
from helexa.mesh.gossip.auth import MeshAuth
from helexa.mesh.gossip.transport import PeerAddr
from helexa.mesh.logs import QuietLog
from helexa.mesh.routing.decisions import Cortex, RemoteDecision
from helexa.mesh.routing.neuron import REFUSAL_CODES
from helexa.mesh.routing.peer_client import FORWARD_PREFIX, proves_membership, target_of
from helexa.mesh.routing.proxy import PeerFailed, PeerNoResponse, PeerRefused, PeerUnreachable, forward
from helexa.mesh.timing import (
    DEFAULT_RETRY_AFTER_S,
    NON_STREAM_STALL_TIMEOUT_S,
    PEER_RESPONSE_START_TIMEOUT_S,
    PROXY_CONNECT_TIMEOUT_S,
    PROXY_STALL_TIMEOUT_S,
)

log = logging.getLogger(__name__)

__all__ = ["Forwarder"]

# Peers' proofs of membership remembered (per node, run and address); forgotten all at once past this.
_MAX_PROOFS = 4096
Proof = tuple[NodeId, int, str, int]  # (node id, generation, address, port)


def _wants_stream(body: bytes) -> bool:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(data, dict) and data.get("stream") is True


def _error_code(body: bytes) -> str | None:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        code = data["error"].get("code")
        return code if isinstance(code, str) else None
    return None


def _relay(refused: PeerRefused) -> web.Response:
    """A peer's error answer, passed to the client as it was (status, envelope, Retry-After)."""
    headers = {"Content-Type": refused.headers.get("Content-Type", "application/json")}
    if "Retry-After" in refused.headers:
        headers["Retry-After"] = refused.headers["Retry-After"]
    return web.Response(status=refused.status, body=refused.body, headers=headers)


class Forwarder:
    """Forwards requests for remote decisions; see the module docstring."""

    def __init__(
        self,
        *,
        session: Callable[[], aiohttp.ClientSession | None],
        auth: MeshAuth | None,
        fleet: Fleet,
        cortex: Cortex,
        prove_members: bool = False,
        connect_timeout_s: float = PROXY_CONNECT_TIMEOUT_S,
        start_timeout_s: float = PEER_RESPONSE_START_TIMEOUT_S,
        stall_timeout_s: float = PROXY_STALL_TIMEOUT_S,
        non_stream_stall_timeout_s: float = NON_STREAM_STALL_TIMEOUT_S,
        avoid_s: float,
    ) -> None:
        self.session = session
        self.auth = auth
        self.fleet = fleet
        self.cortex = cortex
        # Open mesh with client keys: gossip is open, so a peer's record proves nothing; a peer gets
        # requests only once it has answered a hello signed with the key derived from the client keys.
        self.prove_members = prove_members and auth is not None
        self.connect_timeout_s = connect_timeout_s
        self.start_timeout_s = start_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.non_stream_stall_timeout_s = non_stream_stall_timeout_s
        # How long a failed peer is avoided in routing: long enough for the failure detector to declare a
        # really dead peer dead (the assembly passes twice its dead-after time).
        self.avoid_s = avoid_s
        self._proven: set[Proof] = set()
        self._unproven: dict[Proof, float] = {}  # → monotonic time until which it is not asked again
        self._strangers = QuietLog()

    def _avoid(self, node: NodeRecord, why: str) -> None:
        log.warning("peer %s (%s) failed a forwarded request: %s", node.name, node.node_id[:8], why)
        self.fleet.avoid(node.node_id, for_s=self.avoid_s)

    def _on_failure(self, node: NodeRecord) -> Callable[[str], None]:
        return lambda reason: self._avoid(node, f"mid-response: {reason}")

    async def _is_member(self, session: aiohttp.ClientSession, node: NodeRecord) -> bool:
        """Whether `node` may receive this agent's clients' requests (always, unless `prove_members`)."""
        if not self.prove_members or node.node_id == self.fleet.node_id:
            return True
        assert self.auth is not None
        key: Proof = (node.node_id, node.generation, node.address, node.port)
        if key in self._proven:
            return True
        now = time.monotonic()
        if self._unproven.get(key, 0.0) > now:
            return False
        if await proves_membership(session, self.auth, node, timeout_s=self.start_timeout_s):
            if len(self._proven) >= _MAX_PROOFS:
                self._proven.clear()
            self._proven.add(key)
            self._unproven.pop(key, None)
            return True
        if len(self._unproven) >= _MAX_PROOFS:
            self._unproven.clear()
        self._unproven[key] = now + self.avoid_s
        level = self._strangers.level(node.node_id)
        log.log(
            level,
            "not forwarding to %s (%s) at %s:%d: it did not prove it holds this agent's client API keys"
            " (a stranger's gossip record, or an agent configured with other keys)%s",
            node.name[:64],
            node.node_id[:8],
            node.address[:64],
            node.port,
            "" if level == logging.DEBUG else "; repeats are logged at debug",
        )
        self.fleet.avoid(node.node_id, for_s=self.avoid_s)
        return False

    async def __call__(
        self, request: web.Request, decision: RemoteDecision, body: bytes
    ) -> web.StreamResponse:
        session = self.session()
        if session is None:
            raise errors.ModelUnavailable("this agent is not running", reason="draining", retry_after_s=1.0)
        stream = _wants_stream(body)
        stall_s = self.stall_timeout_s if stream else self.non_stream_stall_timeout_s
        tried: set[str] = set()
        refusal: PeerRefused | None = None
        queue: Sequence[NodeRecord] = (decision.node, *decision.candidates)
        for attempt in range(2):
            for node in queue:
                if node.node_id in tried:
                    continue
                tried.add(node.node_id)
                if not await self._is_member(session, node):
                    continue
                try:
                    return await forward(
                        request,
                        session=session,
                        target=PeerAddr(node.address, node.port),
                        body=body,
                        path=FORWARD_PREFIX + request.raw_path,
                        auth=self.auth,
                        node=target_of(node),
                        connect_timeout_s=self.connect_timeout_s,
                        start_timeout_s=self.start_timeout_s,
                        stall_timeout_s=stall_s,
                        deferred=not stream,
                        refuse_statuses=(401, 503),
                        on_failure=self._on_failure(node),
                    )
                except (PeerUnreachable, PeerNoResponse) as e:
                    self._avoid(node, e.reason)
                except PeerRefused as e:
                    if e.status == 401:
                        self._avoid(
                            node, "it refused this agent's credentials (another mesh key or client keys?)"
                        )
                        continue
                    if _error_code(e.body) not in REFUSAL_CODES:
                        return _relay(e)
                    log.info("peer %s refused %s (%s); trying the next node", node.name, decision.entry.id, e)
                    refusal = e
                except PeerFailed as e:
                    self._avoid(node, e.reason)
                    raise errors.UpstreamError("the node serving this model failed before answering") from e
            if attempt == 1:
                break
            # Everything named was tried: route once more over what is left (failed peers are avoided now).
            try:
                again = self.cortex.route(decision.entry.id)
            except errors.HelexaError:
                break
            # This node after all: served through its own peer endpoint (a rare path).
            me = self.fleet.self_record
            queue = (again.node, *again.candidates) if isinstance(again, RemoteDecision) else (me,)
        if refusal is not None:
            return _relay(refusal)
        raise errors.ModelUnavailable(
            f"No node can serve the model '{decision.entry.id}' right now",
            reason="unreachable",
            retry_after_s=DEFAULT_RETRY_AFTER_S,
        )
