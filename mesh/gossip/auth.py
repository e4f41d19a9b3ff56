"""The mesh key: peers prove membership with an HMAC on every peer request (and gossip reply).

A request to `/mesh/peer/*` carries three headers:

    X-Helexa-Timestamp: 1764221000.123          unix seconds of signing
    X-Helexa-Nonce:     32 hex chars           random, never reused
    X-Helexa-Signature: hex HMAC-SHA256(key, "helexa-req-v1\\n" METHOD \\n RAW-PATH?QUERY \\n
                                              sha256(body) hex \\n TIMESTAMP \\n NONCE)

The receiver refuses a bad MAC (constant-time compare), a timestamp off by more than
`AUTH_MAX_SKEW_S`, and a nonce it has already seen (a bounded cache; entries expire once their timestamp
is outside the window anyway, so the cache only needs to cover one window of traffic).

Buffered replies (gossip) are signed too, bound to the request's nonce (`X-Helexa-Signature` over
"helexa-resp-v1", status, body hash, nonce), so a host answering on a peer's address without the key
cannot inject records. Streamed replies (forwarded inference) are not signed: the request was.

Without a key the mesh is open and nothing here runs. `new_key()` makes a key for `helexa key`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import ClientHandlerType, ClientRequest, ClientResponse, web
from aiohttp.typedefs import Middleware

from helexa.mesh.logs import QuietLog
from helexa.mesh.timing import AUTH_MAX_SKEW_S, NONCE_CACHE_SIZE

log = logging.getLogger(__name__)

__all__ = [
    "PEER_PATH_PREFIX",
    "AuthError",
    "MeshAuth",
    "NonceCache",
    "client_middleware",
    "new_key",
    "peer_auth_middleware",
]

TIMESTAMP_HEADER = "X-Helexa-Timestamp"
NONCE_HEADER = "X-Helexa-Nonce"
SIGNATURE_HEADER = "X-Helexa-Signature"
PEER_PATH_PREFIX = "/mesh/peer/"
_MAX_NONCE_CHARS = 64


class AuthError(Exception):
    """A peer request or reply failed authentication; `reason` is safe to log (no secrets)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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
    """Signs and verifies peer traffic with one shared key."""

    def __init__(
        self,
        key: str,
        *,
        max_skew_s: float = AUTH_MAX_SKEW_S,
        nonce_cache_size: int = NONCE_CACHE_SIZE,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if not key:
            raise ValueError("mesh key must not be empty")
        self._key = key.encode()
        self.max_skew_s = max_skew_s
        self._wall = wall_clock
        self._nonces = NonceCache(max_size=nonce_cache_size, ttl_s=2 * max_skew_s)

    def _mac(self, *parts: str) -> str:
        return hmac.new(self._key, "\n".join(parts).encode(), hashlib.sha256).hexdigest()

    def sign(self, method: str, path_qs: str, body: bytes) -> dict[str, str]:
        """Headers to add to a request to a peer. `path_qs` is the raw path with query string."""
        ts = f"{self._wall():.3f}"
        nonce = secrets.token_hex(16)
        mac = self._mac("helexa-req-v1", method.upper(), path_qs, _body_hash(body), ts, nonce)
        return {TIMESTAMP_HEADER: ts, NONCE_HEADER: nonce, SIGNATURE_HEADER: mac}

    def verify(self, method: str, path_qs: str, body: bytes, headers: Mapping[str, str]) -> str:
        """Check a request; returns its nonce. Raises `AuthError` (bad MAC, stale, replayed, missing)."""
        ts = headers.get(TIMESTAMP_HEADER)
        nonce = headers.get(NONCE_HEADER)
        sig = headers.get(SIGNATURE_HEADER)
        if not ts or not nonce or not sig:
            raise AuthError("missing signature headers")
        if len(nonce) > _MAX_NONCE_CHARS or len(ts) > 32 or len(sig) > 128:
            raise AuthError("malformed signature headers")
        expected = self._mac("helexa-req-v1", method.upper(), path_qs, _body_hash(body), ts, nonce)
        if not hmac.compare_digest(expected.encode(), sig.encode("utf-8", "replace")):
            raise AuthError("bad signature")
        try:
            ts_s = float(ts)
        except ValueError:
            raise AuthError("malformed timestamp") from None
        now = self._wall()
        if not abs(now - ts_s) <= self.max_skew_s:  # also false for NaN
            raise AuthError(f"timestamp off by {now - ts_s:.0f} s")
        if not self._nonces.check_and_add(nonce, time.monotonic()):
            raise AuthError("replayed nonce")
        return nonce

    def sign_response(self, request_nonce: str, status: int, body: bytes) -> dict[str, str]:
        return {SIGNATURE_HEADER: self._mac("helexa-resp-v1", str(status), _body_hash(body), request_nonce)}

    def verify_response(
        self, request_nonce: str, status: int, body: bytes, headers: Mapping[str, str]
    ) -> None:
        sig = headers.get(SIGNATURE_HEADER, "")
        expected = self._mac("helexa-resp-v1", str(status), _body_hash(body), request_nonce)
        if not hmac.compare_digest(expected.encode(), sig.encode("utf-8", "replace")):
            raise AuthError("bad or missing reply signature")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def peer_auth_middleware(auth: MeshAuth | None, *, prefix: str = PEER_PATH_PREFIX) -> Middleware:
    """aiohttp server middleware: verify every request under `prefix` (no-op without a key).

    Refusals get 401 with the OpenAI error envelope. Buffered replies (`web.Response` with a bytes body)
    are signed for the requester. Reads the body (`request.read()`, cached for the handler), so the app's
    `client_max_size` bounds it.
    """
    refusals = QuietLog()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if auth is None or not request.path.startswith(prefix):
            return await handler(request)
        body = await request.read()
        try:
            nonce = auth.verify(request.method, request.raw_path, body, request.headers)
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
            return web.json_response(
                {
                    "error": {
                        "message": "peer authentication failed",
                        "type": "authentication_error",
                        "param": None,
                        "code": "mesh_auth",
                    }
                },
                status=401,
            )
        response = await handler(request)
        if isinstance(response, web.Response) and not response.prepared:
            payload = response.body
            if isinstance(payload, bytes | bytearray):
                response.headers.update(auth.sign_response(nonce, response.status, bytes(payload)))
        return response

    return middleware


def client_middleware(
    auth: MeshAuth,
) -> Callable[[ClientRequest, ClientHandlerType], Awaitable[ClientResponse]]:
    """aiohttp client middleware that signs every request of a session (`ClientSession(middlewares=...)`).

    Buffers the request body to hash it (peer requests are small JSON bodies).
    """

    async def middleware(req: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        payload = req.body
        body = payload if isinstance(payload, bytes) else await payload.as_bytes()
        req.headers.update(auth.sign(req.method, req.url.raw_path_qs, body))
        return await handler(req)

    return middleware
