"""Headers every answer of the agent gets: an `x-request-id`, and CORS for browser front-ends.

CORS: a preflight (`OPTIONS` with `Access-Control-Request-Method`) from an allowed origin is answered 204
with the methods and headers it asked for; any answer to an allowed origin carries
`Access-Control-Allow-Origin`. Allowed by default: loopback origins only (as Ollama does), since a wide-open
default would let any web page a user visits drive the fleet through the user's browser; the
`cors_origins` setting adds origins, and "*" allows any. Requests from other origins are served as before
(a browser then hides the answer from the page); their preflights get 403.

`x-request-id`: the client's own, when it sent a short printable one, else a new id; the same id is what a
log line would name.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Middleware

from helexa.mesh.server.middleware import Handler

__all__ = ["CorsPolicy", "add_response_headers", "cors_middleware"]

REQUEST_ID_HEADER: Final = "X-Request-Id"
_LOOPBACK = re.compile(r"^https?://(localhost|127\.0\.0\.1|\[::1\])(:\d{1,5})?$", re.IGNORECASE)
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Preflight answers may be cached by the browser this long (seconds).
PREFLIGHT_MAX_AGE_S: Final = 600
_ALLOW_METHODS: Final = "GET, POST, DELETE, OPTIONS"


class CorsPolicy:
    """Which origins may call the API from a browser."""

    def __init__(self, origins: Sequence[str] = ()) -> None:
        self.any = "*" in origins
        self.origins = frozenset(o.rstrip("/").lower() for o in origins if o != "*")

    def allows(self, origin: str) -> bool:
        origin = origin.rstrip("/")
        return self.any or bool(_LOOPBACK.match(origin)) or origin.lower() in self.origins


CORS_POLICY: Final = web.AppKey("helexa_cors_policy", CorsPolicy)


def cors_middleware(policy: CorsPolicy) -> Middleware:
    """Answers preflights (before authentication: browsers send them without credentials)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if request.method == "OPTIONS" and origin and "Access-Control-Request-Method" in request.headers:
            if not policy.allows(origin):
                return web.Response(status=403, text="origin not allowed")
            asked = request.headers.get("Access-Control-Request-Headers", "")
            return web.Response(
                status=204,
                headers={
                    "Access-Control-Allow-Origin": origin,
                    "Access-Control-Allow-Methods": _ALLOW_METHODS,
                    "Access-Control-Allow-Headers": asked or "Authorization, Content-Type",
                    "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S),
                    "Vary": "Origin",
                },
            )
        return await handler(request)

    return middleware


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    given = request.headers.get(REQUEST_ID_HEADER, "")
    response.headers[REQUEST_ID_HEADER] = given if _CLIENT_ID.match(given) else f"req_{uuid.uuid4().hex}"
    origin = request.headers.get("Origin")
    policy = request.app.get(CORS_POLICY)
    if origin and policy is not None and policy.allows(origin):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = f"{REQUEST_ID_HEADER}, Retry-After"
        response.headers.add("Vary", "Origin")


def add_response_headers(app: web.Application, policy: CorsPolicy) -> None:
    """`x-request-id` and CORS on every answer of `app` (streams included: set before they start)."""
    app[CORS_POLICY] = policy
    app.on_response_prepare.append(_on_prepare)
