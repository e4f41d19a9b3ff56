"""The mesh key: peers prove membership with an HMAC on every peer request (and buffered reply).

A request to `/mesh/peer/*` carries four headers:

    X-Helexa-Timestamp: 1764221000.123              unix seconds of signing
    X-Helexa-Nonce:     32 hex chars               random, never reused
    X-Helexa-Target:    <node id>@<generation>     the agent, and the run of it, the request is for
    X-Helexa-Signature: hex HMAC-SHA256(key, "helexa-req-v2\n" METHOD \n RAW-PATH?QUERY \n
                                              sha256(body) hex \n TIMESTAMP \n NONCE \n TARGET)

The receiver refuses a bad MAC (constant-time compare), a timestamp off by more than `AUTH_MAX_SKEW_S`,
a target other than its own current binding (its node id and generation), and a nonce it has already seen
(a bounded cache; entries expire once their timestamp is outside the window anyway, so the cache only
needs to cover one window of traffic).

**Binding to the target** is what makes a captured request worthless elsewhere: it is refused by every
other agent (another node id) and by the same agent after a restart (a new generation: generations grow
at every start, `mesh.identity`), so the replay window stays closed across restarts although the nonce
cache is in memory and starts empty. (Before, a captured `/mesh/peer/load` was accepted by any agent of
the mesh, and by the one it was sent to once it had restarted.)

**First contact** (gossip to a seed address whose node id is not known yet, or to a peer that restarted
since its record was read): the sender signs for the target `*`, or for the binding it knows. The
receiver refuses any target but its own, but when only the target is wrong (MAC and timestamp good, so
the sender holds the key) it answers `401` with the code `mesh_target` and its binding in
`X-Helexa-Node`, signed like a reply (bound to the request's nonce). The sender checks that signature and
sends again, bound (`MeshAuth.challenge`; `mesh.gossip.transport.HttpTransport` does it for gossip and
remembers the binding per address, `mesh.routing.peer_client` and `mesh.routing.proxy` for a peer that
restarted). Chosen over accepting an unbound signature on the gossip path, because anything accepted
unbound can be replayed on every agent within the window; and over learning ids from mDNS, because static
peers have no mDNS record and an mDNS record is unauthenticated. It costs one round trip per first contact.

Buffered replies (gossip, load, unload) are signed too: `X-Helexa-Node` (the responder's binding) and
`X-Helexa-Signature` over "helexa-resp-v2", status, body hash, the request's nonce and that binding, so a
host answering on a peer's address without the key cannot inject records, and a reply says which agent
sent it. Streamed replies (forwarded inference) are not signed: the request was.

One `MeshAuth` per key. With a mesh key every peer path is guarded. On an open mesh (no mesh key) with
client API keys, `MeshAuth.for_client_keys` derives a key from the sorted set of client keys, and every
peer path but gossip is guarded with it: only agents configured with the same client keys forward
requests to this one, or receive its clients' requests (`mesh.routing.forwarding`). Without either,
nothing here runs. `new_key()` makes a key for `helexa key`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from typing import Any

from aiohttp import ClientHandlerType, ClientRequest, ClientResponse, web
from aiohttp.typedefs import Middleware

from helexa.mesh.logs import QuietLog
from helexa.mesh.timing import AUTH_MAX_SKEW_S, NONCE_CACHE_SIZE

log = logging.getLogger(__name__)

__all__ = [
    "ANY_TARGET",
    "NODE_HEADER",
    "PEER_PATH_PREFIX",
    "TARGET_CODE",
    "AuthError",
    "MeshAuth",
    "NonceCache",
    "TargetMismatch",
    "binding",
    "binding_node",
    "client_middleware",
    "new_key",
    "peer_auth_middleware",
]

TIMESTAMP_HEADER = "X-Helexa-Timestamp"
NONCE_HEADER = "X-Helexa-Nonce"
TARGET_HEADER = "X-Helexa-Target"
SIGNATURE_HEADER = "X-Helexa-Signature"
NODE_HEADER = "X-Helexa-Node"
PEER_PATH_PREFIX = "/mesh/peer/"
# The target of a request whose sender does not know the receiver's binding yet (refused, with a challenge).
ANY_TARGET = "*"
# The error code of a refusal for the target alone (the reply carries the receiver's signed binding).
TARGET_CODE = "mesh_target"
_MAX_NONCE_CHARS = 64
_MAX_TARGET_CHARS = 200
_CLIENT_KEYS_CONTEXT = b"helexa-client-keys-v1"


class AuthError(Exception):
    """A peer request or reply failed authentication; `reason` is safe to log (no secrets)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TargetMismatch(AuthError):
    """A well-signed request for another agent or another run of this one (or for `*`): answered with a
    challenge that carries this agent's binding, signed for the request's `nonce`."""

    def __init__(self, reason: str, nonce: str) -> None:
        super().__init__(reason)
        self.nonce = nonce


def binding(node_id: str, generation: int) -> str:
    """What a request is bound to: one agent (its node id) in one run of it (its generation)."""
    return f"{node_id}@{generation}"


def binding_node(value: str) -> str:
    """The node id part of a binding (`binding(...)`)."""
    return value.rpartition("@")[0]


def new_key() -> str:
    """A fresh random mesh key (256 bits, URL-safe text) for `helexa key`."""
    return secrets.token_urlsafe(32)


class NonceCache:
    """Nonces seen within the replay window, bounded in size (oldest evicted first)."""

    def __init__(self, *, max_size: int = NONCE_CACHE_SIZE, ttl_s: float = 2 * AUTH_MAX_SKEW_S) -> None:
        self.max_size = max_size
        self.ttl_s = ttl_s
        self._seen: OrderedDict[str, float] = OrderedDict()  # nonce → expiry (monotonic), insertion order

    def __len__(self) -> int:
        return len(self._seen)

    def check_and_add(self, nonce: str, now: float) -> bool:
        """True if the nonce is new (and now remembered), False on a replay."""
        while self._seen:
            oldest, expires = next(iter(self._seen.items()))
            if expires > now and len(self._seen) < self.max_size:
                break
            del self._seen[oldest]
        if nonce in self._seen:
            return False
        self._seen[nonce] = now + self.ttl_s
        return True


def _body_hash(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


class MeshAuth:
    """Signs and verifies peer traffic with one shared key.

    `local()` is this agent's current binding (`binding(node_id, generation)`; `bind` sets it once the
    agent's gossip exists). Unbound (tests of the signing alone), it accepts only the target `*`."""

    def __init__(
        self,
        key: str,
        *,
        local: Callable[[], str] | None = None,
        max_skew_s: float = AUTH_MAX_SKEW_S,
        nonce_cache_size: int = NONCE_CACHE_SIZE,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if not key:
            raise ValueError("mesh key must not be empty")
        self._key = key.encode()
        self._local = local
        self.max_skew_s = max_skew_s
        self._wall = wall_clock
        self._nonces = NonceCache(max_size=nonce_cache_size, ttl_s=2 * max_skew_s)

    @classmethod
    def for_client_keys(cls, api_keys: Iterable[str], **kwargs: Any) -> MeshAuth:
        """The agent-to-agent credential of an open mesh with client API keys: a key derived (HMAC-SHA256)
        from the sorted set of client keys, so agents configured with the same keys share it and nobody
        else does; the client keys themselves never travel."""
        keys = sorted({k for k in api_keys if k})
        if not keys:
            raise ValueError("no client API keys to derive a peer key from")
        derived = hmac.new(_CLIENT_KEYS_CONTEXT, "\n".join(keys).encode(), hashlib.sha256).hexdigest()
        return cls(derived, **kwargs)

    def bind(self, local: Callable[[], str]) -> None:
        """Bind this agent's side: requests must be signed for `local()`, replies say it."""
        self._local = local

    def local(self) -> str:
        return self._local() if self._local is not None else ANY_TARGET

    def _mac(self, *parts: str) -> str:
        return hmac.new(self._key, "\n".join(parts).encode(), hashlib.sha256).hexdigest()

    def sign(self, method: str, path_qs: str, body: bytes, *, target: str = ANY_TARGET) -> dict[str, str]:
        """Headers to add to a request to a peer. `path_qs` is the raw path with query string; `target` the
        receiver's binding (`*` when not known yet: refused with a challenge, see the module docstring)."""
        ts = f"{self._wall():.3f}"
        nonce = secrets.token_hex(16)
        mac = self._mac("helexa-req-v2", method.upper(), path_qs, _body_hash(body), ts, nonce, target)
        return {TIMESTAMP_HEADER: ts, NONCE_HEADER: nonce, TARGET_HEADER: target, SIGNATURE_HEADER: mac}

    def verify(self, method: str, path_qs: str, body: bytes, headers: Mapping[str, str]) -> str:
        """Check a request; returns its nonce. Raises `AuthError` (bad MAC, stale, replayed, missing), or
        `TargetMismatch` for a good signature bound to another agent or run."""
        ts = headers.get(TIMESTAMP_HEADER)
        nonce = headers.get(NONCE_HEADER)
        target = headers.get(TARGET_HEADER)
        sig = headers.get(SIGNATURE_HEADER)
        if not ts or not nonce or not sig or not target:
            raise AuthError("missing signature headers")
        if len(nonce) > _MAX_NONCE_CHARS or len(ts) > 32 or len(sig) > 128 or len(target) > _MAX_TARGET_CHARS:
            raise AuthError("malformed signature headers")
        expected = self._mac("helexa-req-v2", method.upper(), path_qs, _body_hash(body), ts, nonce, target)
        if not hmac.compare_digest(expected.encode(), sig.encode("utf-8", "replace")):
            raise AuthError("bad signature")
        try:
            ts_s = float(ts)
        except ValueError:
            raise AuthError("malformed timestamp") from None
        now = self._wall()
        if not abs(now - ts_s) <= self.max_skew_s:  # also false for NaN
            raise AuthError(f"timestamp off by {now - ts_s:.0f} s")
        if target != self.local():
            raise TargetMismatch("signed for another agent, or an earlier run of this one", nonce)
        if not self._nonces.check_and_add(nonce, time.monotonic()):
            raise AuthError("replayed nonce")
        return nonce

    def sign_response(self, request_nonce: str, status: int, body: bytes) -> dict[str, str]:
        """Headers for a buffered reply to the request with `request_nonce`: this agent's binding, signed."""
        node = self.local()
        mac = self._mac("helexa-resp-v2", str(status), _body_hash(body), request_nonce, node)
        return {NODE_HEADER: node, SIGNATURE_HEADER: mac}

    def verify_response(
        self, request_nonce: str, status: int, body: bytes, headers: Mapping[str, str]
    ) -> str:
        """Check a reply to our request with `request_nonce`; returns the responder's binding."""
        sig = headers.get(SIGNATURE_HEADER, "")
        node = headers.get(NODE_HEADER, "")
        expected = self._mac("helexa-resp-v2", str(status), _body_hash(body), request_nonce, node)
        if not node or not hmac.compare_digest(expected.encode(), sig.encode("utf-8", "replace")):
            raise AuthError("bad or missing reply signature")
        return node

    def challenge(
        self, request_nonce: str, status: int, body: bytes, headers: Mapping[str, str]
    ) -> str | None:
        """The responder's binding when its reply refused our request for its target alone (a signed
        `401 mesh_target`: send again, bound to it); None for any other reply, or a forged one."""
        if status != 401 or TARGET_CODE.encode() not in body:
            return None
        try:
            node = self.verify_response(request_nonce, status, body, headers)
        except AuthError:
            return None
        return node if node != ANY_TARGET and len(node) <= _MAX_TARGET_CHARS else None


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _refusal(code: str, message: str) -> web.Response:
    envelope = {"error": {"message": message, "type": "authentication_error", "param": None, "code": code}}
    return web.json_response(envelope, status=401)


def peer_auth_middleware(
    auth: MeshAuth | None, *, prefix: str = PEER_PATH_PREFIX, exempt: Collection[str] = ()
) -> Middleware:
    """aiohttp server middleware: verify every request under `prefix` but the `exempt` paths (no-op
    without a key).

    Refusals get 401 with the OpenAI error envelope; a refusal for the target alone is a signed challenge
    (code `mesh_target`, see the module docstring). Buffered replies (`web.Response` with a bytes body)
    are signed for the requester. Reads the body (`request.read()`, cached for the handler), so the app's
    `client_max_size` bounds it.
    """
    refusals = QuietLog()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if auth is None or not request.path.startswith(prefix) or request.path in exempt:
            return await handler(request)
        body = await request.read()
        try:
            nonce = auth.verify(request.method, request.raw_path, body, request.headers)
        except TargetMismatch as e:
            # A first contact, or a peer that has not seen this agent restart yet: it retries, bound.
            log.debug("challenging a peer request from %s to %s: %s", request.remote, request.path, e.reason)
            challenge = _refusal(TARGET_CODE, "peer request signed for another agent or run of it")
            assert isinstance(challenge.body, bytes)
            challenge.headers.update(auth.sign_response(e.nonce, challenge.status, challenge.body))
            return challenge
        except AuthError as e:
            remote = request.remote or "?"
            level = refusals.level(remote)
            # A misconfigured peer retries every second: warn once per remote, then at debug.
            log.log(
                level,
                "refusing unauthenticated peer request from %s to %s: %s%s",
                remote,
                request.path,
                e.reason,
                " (mesh key missing or different? further refusals from it are logged at debug)"
                if level > logging.DEBUG
                else "",
            )
            return _refusal("mesh_auth", "peer authentication failed")
        response = await handler(request)
        if isinstance(response, web.Response) and not response.prepared:
            payload = response.body
            if isinstance(payload, bytes | bytearray):
                response.headers.update(auth.sign_response(nonce, response.status, bytes(payload)))
        return response

    return middleware


def client_middleware(
    auth: MeshAuth, *, target: str = ANY_TARGET
) -> Callable[[ClientRequest, ClientHandlerType], Awaitable[ClientResponse]]:
    """aiohttp client middleware that signs every request of a session (`ClientSession(middlewares=...)`)
    for the receiver bound to `target`.

    Buffers the request body to hash it (peer requests are small JSON bodies).
    """

    async def middleware(req: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        payload = req.body
        body = payload if isinstance(payload, bytes) else await payload.as_bytes()
        req.headers.update(auth.sign(req.method, req.url.raw_path_qs, body, target=target))
        return await handler(req)

    return middleware
