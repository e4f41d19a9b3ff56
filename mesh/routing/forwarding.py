"""The `FORWARDER` of the HTTP edge: serve a `RemoteDecision` by forwarding to the peer it names.

    app[FORWARDER] = Forwarder(session=lambda: http, auth=..., fleet=..., cortex=...)   # mesh.assembly

The request goes to the peer's `/mesh/peer<original path>` (signed with the mesh key when there is one)
with `X-Helexa-Forwarded: 1`, so the target serves it locally and never routes it again: it cold-loads
if needed (its own single-flight joins concurrent loads) and streams keep-alive comments while loading.
`mesh.routing.proxy.forward` passes the bytes through with connect and stall timeouts, never a total
one, and a client that goes away closes the upstream connection, which cancels the work there.

Failures:
- the peer cannot be reached (nothing ran there): it is avoided in routing (`Fleet.avoid`) and the next
  candidate is tried; once the list is exhausted the request is routed once more over what is left (the
  model may be loaded elsewhere, or fit on this node);
- the peer refuses (503 with code `no_room` or `node_draining`): the next candidate;
- the peer fails before answering: 502 (the request may have run there: never retried), peer avoided;
- the peer dies mid-stream: the client gets a final `data: {"error": ...}` event at once (the proxy), and
  the peer is avoided so the next request goes elsewhere without waiting for the failure detector.

Client API keys: with a mesh key, a forwarded request is authenticated as a peer's and the serving agent
waives client keys (the entry agent checked them). In an open mesh the client's `Authorization` travels
in `X-Helexa-Client-Authorization` and the serving agent checks it against its own keys.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import aiohttp
import orjson
from aiohttp import web

from helexa.mesh import errors
from helexa.mesh.fleet.records import NodeRecord
from helexa.mesh.fleet.view import Fleet
from helexa.mesh.gossip.auth import MeshAuth
from helexa.mesh.gossip.transport import PeerAddr
from helexa.mesh.routing.decisions import Cortex, RemoteDecision
from helexa.mesh.routing.neuron import REFUSAL_CODES
from helexa.mesh.routing.peer_client import CLIENT_AUTH_HEADER, FORWARD_PREFIX
from helexa.mesh.routing.proxy import PeerFailed, PeerRefused, PeerUnreachable, forward
from helexa.mesh.timing import (
    DEFAULT_RETRY_AFTER_S,
    NON_STREAM_STALL_TIMEOUT_S,
    PROXY_CONNECT_TIMEOUT_S,
    PROXY_STALL_TIMEOUT_S,
)

log = logging.getLogger(__name__)

__all__ = ["Forwarder"]


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
        connect_timeout_s: float = PROXY_CONNECT_TIMEOUT_S,
        stall_timeout_s: float = PROXY_STALL_TIMEOUT_S,
        non_stream_stall_timeout_s: float = NON_STREAM_STALL_TIMEOUT_S,
        avoid_s: float,
    ) -> None:
        self.session = session
        self.auth = auth
        self.fleet = fleet
        self.cortex = cortex
        self.connect_timeout_s = connect_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.non_stream_stall_timeout_s = non_stream_stall_timeout_s
        # How long a failed peer is avoided in routing: long enough for the failure detector to declare a
        # really dead peer dead (the assembly passes twice its dead-after time).
        self.avoid_s = avoid_s

    def _avoid(self, node: NodeRecord, why: str) -> None:
        log.warning("peer %s (%s) failed a forwarded request: %s", node.name, node.node_id[:8], why)
        self.fleet.avoid(node.node_id, for_s=self.avoid_s)

    def _on_failure(self, node: NodeRecord) -> Callable[[str], None]:
        return lambda reason: self._avoid(node, f"mid-response: {reason}")

    async def __call__(
        self, request: web.Request, decision: RemoteDecision, body: bytes
    ) -> web.StreamResponse:
        session = self.session()
        if session is None:
            raise errors.ModelUnavailable("this agent is not running", reason="draining", retry_after_s=1.0)
        stall_s = self.stall_timeout_s if _wants_stream(body) else self.non_stream_stall_timeout_s
        extra: dict[str, str] = {}
        if self.auth is None and "Authorization" in request.headers:
            extra[CLIENT_AUTH_HEADER] = request.headers["Authorization"]
        tried: set[str] = set()
        refusal: PeerRefused | None = None
        queue: Sequence[NodeRecord] = (decision.node, *decision.candidates)
        for attempt in range(2):
            for node in queue:
                if node.node_id in tried:
                    continue
                tried.add(node.node_id)
                target = PeerAddr(node.address, node.port)
                try:
                    return await forward(
                        request,
                        session=session,
                        target=target,
                        body=body,
                        path=FORWARD_PREFIX + request.raw_path,
                        auth=self.auth,
                        connect_timeout_s=self.connect_timeout_s,
                        stall_timeout_s=stall_s,
                        refuse_statuses=(503,),
                        extra_headers=extra,
                        on_failure=self._on_failure(node),
                    )
                except PeerUnreachable as e:
                    self._avoid(node, e.reason)
                except PeerRefused as e:
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
