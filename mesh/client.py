"""The HTTP client of an agent's API (`/mesh/*` operator and fleet calls, `/v1` chat), shared by the
`helexa` operator commands (`mesh.cli.ops`) and the dashboard (`tui`).

    async with AgentClient(url, mesh_key=..., api_key=...) as client:
        state = await client.state()
        await client.load("org/model", node="beast")     # answered once loaded (no total bound)
        async for event in client.events(): ...          # GET /mesh/events (SSE)

Foreign exceptions stop here: callers see `AgentError` (the agent answered with an error) or
`AgentUnreachable` (no answer). The mesh key goes to `/mesh/*` only, a client API key to `/v1/*` only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from helexa.mesh.timing import CLIENT_CONNECT_TIMEOUT_S, CLIENT_REQUEST_TIMEOUT_S

logger = logging.getLogger(__name__)

DEFAULT_AGENT_URL = "http://127.0.0.1:31313"

# Fields of a `/mesh/state` catalogue entry that the agent derives; never written back.
DERIVED_ENTRY_FIELDS = frozenset({"feasible_on", "locations", "version", "status", "loaded"})


class AgentError(Exception):
    """The agent answered with an error (the OpenAI envelope, or a bare HTTP error)."""

    def __init__(self, message: str, *, status: int, type: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.code = code

    def __str__(self) -> str:
        detail = ", ".join(p for p in (self.code or self.type, f"HTTP {self.status}") if p)
        return f"{self.message} ({detail})"


class AgentUnreachable(Exception):
    """No answer from the agent: connection refused, DNS failure, timeout, dropped connection."""


def agent_url(value: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    url = value or env.get("HELEXA_AGENT") or DEFAULT_AGENT_URL
    if "://" not in url:
        url = f"http://{url}"
    return url.rstrip("/")


def _error_from(status: int, body: bytes) -> AgentError:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", "replace").strip().splitlines()
        return AgentError(text[0][:200] if text else "no details", status=status)
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        return AgentError(
            str(err.get("message") or "no details"),
            status=status,
            type=err.get("type") if isinstance(err.get("type"), str) else None,
            code=err.get("code") if isinstance(err.get("code"), str) else None,
        )
    if isinstance(err, str):
        return AgentError(err, status=status)
    return AgentError(f"unexpected answer {str(data)[:200]}", status=status)


class AgentClient:
    """The agent's operator and fleet API over one `aiohttp.ClientSession`.

    Foreign exceptions stop here: callers see `AgentError` or `AgentUnreachable` only.
    """

    def __init__(
        self,
        url: str,
        session: aiohttp.ClientSession | None = None,
        *,
        mesh_key: str | None = None,
        api_key: str | None = None,
    ) -> None:
        self.url = agent_url(url)
        self._session = session
        self._owns_session = session is None
        self._mesh_key = mesh_key or None
        self._api_key = api_key or None

    def _headers(self, path: str, headers: dict[str, str]) -> dict[str, str]:
        """Add `Authorization`: the mesh key for the operator API, the client API key for `/v1`; never
        one to the other (a client key must not be mistaken for the mesh secret, nor leak it)."""
        key = None
        if path.startswith("/mesh/"):
            key = self._mesh_key
        elif path.startswith("/v1/"):
            key = self._api_key
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _error(self, path: str, status: int, body: bytes) -> AgentError:
        error = _error_from(status, body)
        if status == 401 and path.startswith("/mesh/"):
            hint = "a wrong mesh key" if self._mesh_key else "no mesh key"
            error.message += f" ({hint}: pass --mesh-key or set HELEXA_MESH_KEY)"
        elif status == 401 and path.startswith("/v1/"):
            hint = "a wrong API key" if self._api_key else "no API key"
            error.message += f" ({hint}: pass --api-key or set HELEXA_API_KEY)"
        return error

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(
                    total=CLIENT_REQUEST_TIMEOUT_S, sock_connect=CLIENT_CONNECT_TIMEOUT_S
                )
            )
            self._owns_session = True
        return self._session

    async def aclose(self) -> None:
        if self._owns_session and self._session is not None and not self._session.closed:
            await self._session.close()

    def _unreachable(self, exc: BaseException) -> AgentUnreachable:
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, aiohttp.ClientConnectorError):
            reason = str(exc.os_error.strerror or exc.os_error) if exc.os_error else reason
            if isinstance(exc.os_error, ConnectionRefusedError):
                reason = "connection refused (is `helexa agent` running there?)"
        elif isinstance(exc, TimeoutError):
            reason = "timed out"
        return AgentUnreachable(f"cannot reach the agent at {self.url}: {reason}")

    async def request_bytes(
        self, method: str, path: str, payload: Any = None, *, long_running: bool = False
    ) -> bytes:
        """One call; `long_running` drops the total bound (only connecting is bounded)."""
        data = orjson.dumps(payload) if payload is not None else None
        headers = self._headers(path, {"Content-Type": "application/json"} if data is not None else {})
        extra: dict[str, Any] = {}
        if long_running:
            extra["timeout"] = aiohttp.ClientTimeout(
                total=None, sock_connect=CLIENT_CONNECT_TIMEOUT_S, sock_read=None
            )
        try:
            async with self.session.request(
                method, self.url + path, data=data, headers=headers, **extra
            ) as resp:
                body = await resp.read()
                if resp.status >= 400:
                    raise self._error(path, resp.status, body)
                return body
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise self._unreachable(exc) from exc

    async def request(
        self, method: str, path: str, payload: Any = None, *, long_running: bool = False
    ) -> Any:
        body = await self.request_bytes(method, path, payload, long_running=long_running)
        if not body.strip():
            return {}
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise AgentError(f"the agent sent something that is not JSON on {path}", status=200) from exc

    async def state_bytes(self) -> bytes:
        return await self.request_bytes("GET", "/mesh/state")

    async def state(self) -> dict[str, Any]:
        data = await self.request("GET", "/mesh/state")
        if not isinstance(data, dict):
            raise AgentError("/mesh/state is not a JSON object", status=200)
        return data

    async def catalogue(self) -> list[dict[str, Any]]:
        """`GET /mesh/catalogue`: a list of entries (a bare list, or under `data`/`catalogue`)."""
        data = await self.request("GET", "/mesh/catalogue")
        if isinstance(data, dict):
            data = data.get("data", data.get("catalogue", data.get("models", [])))
        if not isinstance(data, list):
            raise AgentError("/mesh/catalogue is not a list of entries", status=200)
        return [e for e in data if isinstance(e, dict)]

    async def put_entry(self, entry: Mapping[str, Any]) -> Any:
        clean = {k: v for k, v in entry.items() if k not in DERIVED_ENTRY_FIELDS}
        return await self.request("POST", "/mesh/catalogue", clean)

    async def delete_entry(self, model_id: str) -> Any:
        return await self.request("DELETE", "/mesh/catalogue/" + quote(model_id, safe=""))

    async def set_pinned(self, model_id: str, pinned_on: Sequence[str]) -> Any:
        """Pin/unpin: read the entry, replace `pinned_on`, write it back."""
        for entry in await self.catalogue():
            if model_id == entry.get("id") or model_id in (entry.get("aliases") or ()):
                return await self.put_entry({**entry, "pinned_on": list(pinned_on)})
        raise AgentError(f"model {model_id!r} is not in the catalogue", status=404, code="model_not_found")

    async def load(self, model: str, node: str | None = None) -> Any:
        """Answered once the model is loaded: no total or read bound (see `CLIENT_REQUEST_TIMEOUT_S`)."""
        payload = {"model": model, "node": node}
        return await self.request("POST", "/mesh/models/load", payload, long_running=True)

    async def unload(self, model: str, node: str | None = None) -> Any:
        return await self.request("POST", "/mesh/models/unload", {"model": model, "node": node})

    async def _sse(self, method: str, path: str, payload: Any = None) -> AsyncIterator[tuple[str, str]]:
        """Yield `(event, data)` for each SSE message; comments and keep-alives are skipped."""
        data = orjson.dumps(payload) if payload is not None else None
        headers = self._headers(path, {"Accept": "text/event-stream"})
        if data is not None:
            headers["Content-Type"] = "application/json"
        # A stream has no total timeout: only connect and stall bounds.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CLIENT_CONNECT_TIMEOUT_S, sock_read=None)
        try:
            async with self.session.request(
                method, self.url + path, data=data, headers=headers, timeout=timeout
            ) as resp:
                if resp.status >= 400:
                    raise self._error(path, resp.status, await resp.read())
                event = "message"
                lines: list[str] = []
                async for raw in resp.content:
                    line = raw.decode("utf-8", "replace").rstrip("\r\n")
                    if not line:
                        if lines:
                            yield event, "\n".join(lines)
                        event, lines = "message", []
                    elif line.startswith(":"):
                        continue
                    elif line.startswith("data:"):
                        lines.append(line[5:].removeprefix(" "))
                    elif line.startswith("event:"):
                        event = line[6:].strip()
                if lines:
                    yield event, "\n".join(lines)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise self._unreachable(exc) from exc

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """`GET /mesh/events` as JSON objects (the SSE event name fills in a missing `type`)."""
        async for event, data in self._sse("GET", "/mesh/events"):
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                logger.debug("skipping a non-JSON event: %r", data[:200])
                continue
            if isinstance(obj, dict):
                if "type" not in obj and event != "message":
                    obj["type"] = event
                yield obj

    async def chat_stream(self, model: str, messages: Sequence[Mapping[str, str]]) -> AsyncIterator[str]:
        """Stream the text deltas of a chat completion; an error event raises `AgentError`."""
        payload = {"model": model, "messages": list(messages), "stream": True}
        async for _event, data in self._sse("POST", "/v1/chat/completions", payload):
            if data.strip() == "[DONE]":
                return
            try:
                chunk = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(chunk, dict):
                continue
            if "error" in chunk:
                raise _error_from(500, data.encode())
            for choice in chunk.get("choices") or ():
                delta = (choice.get("delta") or {}).get("content") if isinstance(choice, dict) else None
                if delta:
                    yield str(delta)
