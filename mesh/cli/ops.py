"""Operator commands against a running agent, and the small HTTP client they (and the TUI) share.

    helexa status [--json]                   the fleet as a table (or the /mesh/state JSON)
    helexa models list [--json]              the mesh-wide catalogue
    helexa models add ID --source S [...]    add or update a catalogue entry (the agent gossips it)
    helexa models remove ID                  remove a catalogue entry
    helexa load MODEL [--node N]             load a model (optionally on one node)
    helexa unload MODEL [--node N]           unload a model (everywhere, or on one node)
    helexa key                               print a new random mesh key
    helexa chat MODEL [PROMPT]               stream a reply; with no prompt, a small REPL on stdin

Every command takes `--agent URL` (default `$HELEXA_AGENT` or http://127.0.0.1:31313). On a keyed mesh the
changing operator calls (load, unload, models add/remove) need the mesh key: `--mesh-key KEY` or
`$HELEXA_MESH_KEY` (sent as `Authorization: Bearer KEY` to `/mesh/*` only). An agent with client API keys
needs one for `chat`: `--api-key KEY` or `$HELEXA_API_KEY` (sent to `/v1/*` only).
Exit codes: 0 ok, 1 the agent refused (its error message is printed as one line on stderr),
2 bad usage, 3 the agent could not be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

logger = logging.getLogger(__name__)

DEFAULT_AGENT_URL = "http://127.0.0.1:31313"
# Operator calls are small and read cached state: a generous total bound is enough for them. A load is
# different: the agent answers `POST /mesh/models/load` once the model *is loaded* (a download can take
# many minutes, with nothing sent meanwhile), so that call has only the connect bound.
REQUEST_TIMEOUT_S = 600.0
CONNECT_TIMEOUT_S = 5.0

EXIT_OK = 0
EXIT_AGENT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

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
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S, sock_connect=CONNECT_TIMEOUT_S)
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
                total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=None
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
        """Answered once the model is loaded: no total or read bound (see `REQUEST_TIMEOUT_S`)."""
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
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=None)
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


# --- output helpers ------------------------------------------------------------------------------


def _gb(mb: int) -> str:
    return f"{mb / 1024:.1f}G"


def _table(rows: Sequence[Sequence[str]]) -> str:
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _dump(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode() + "\n")


def format_status(state: Mapping[str, Any], url: str) -> str:
    """A readable fleet table: one line per node, its models beneath it, then totals."""
    mesh = state.get("mesh", "default")
    security = (
        "OPEN (no mesh key: anyone on the LAN can join)" if state.get("open", True) else "closed (keyed)"
    )
    out = [f"agent {url}   mesh {mesh}   {security}", ""]
    rows: list[list[str]] = [["NODE", "ADDRESS", "STATE", "DEVICES", "MEMORY USED", "MODELS", "AGENT"]]
    model_rows: list[list[str]] = [["MODEL", "NODE", "STATUS", "MEMORY", "IN-FLIGHT", "QUEUED", "TOK/S"]]
    nodes = [n for n in state.get("nodes") or () if isinstance(n, dict)]
    for node in sorted(nodes, key=lambda n: str(n.get("name", ""))):
        devices = [d for d in node.get("devices") or () if isinstance(d, dict)]
        models = [m for m in node.get("models") or () if isinstance(m, dict)]
        total = sum(int(d.get("memory_total_mb") or 0) for d in devices)
        free = sum(int(d.get("memory_free_mb") or 0) for d in devices)
        gpus = [d for d in devices if d.get("kind") == "cuda"]
        dev = f"{len(gpus)}x {gpus[0].get('model', 'GPU')}" if gpus else "cpu"
        rows.append(
            [
                str(node.get("name", "?")),
                f"{node.get('address', '?')}:{node.get('port', '?')}",
                str(node.get("liveness", "?")) + (" (draining)" if node.get("draining") else ""),
                dev,
                f"{_gb(total - free)}/{_gb(total)}",
                str(len(models)),
                str(node.get("agent_version", "")),
            ]
        )
        for m in models:
            status = str(m.get("status", "?"))
            if status == "loading" and isinstance(m.get("progress"), int | float):
                status += f" {m['progress'] * 100:.0f}%"
            if status == "failed" and m.get("error"):
                status += f": {m['error']}"
            tps = m.get("tokens_per_s")
            model_rows.append(
                [
                    str(m.get("id", "?")),
                    str(node.get("name", "?")),
                    status,
                    _gb(int(m.get("memory_mb") or 0)),
                    str(m.get("in_flight", 0)),
                    str(m.get("queued", 0)),
                    f"{tps:.1f}" if isinstance(tps, int | float) else "-",
                ]
            )
    out.append(_table(rows) if len(rows) > 1 else "no nodes")
    out.append("")
    out.append(_table(model_rows) if len(model_rows) > 1 else "no models loaded")
    alive = sum(1 for n in nodes if n.get("liveness") == "alive")
    out += [
        "",
        f"{len(nodes)} nodes ({alive} alive), {len(model_rows) - 1} model instances, "
        f"{len(state.get('catalogue') or ())} catalogue entries",
    ]
    return "\n".join(out)


def format_catalogue(entries: Sequence[Mapping[str, Any]]) -> str:
    rows = [["MODEL", "ENGINE", "MEMORY", "LOADED ON", "FEASIBLE ON", "ALIASES", "PINNED ON"]]
    for e in sorted(entries, key=lambda e: str(e.get("id", ""))):
        locs = [
            str(loc.get("node_name") or loc.get("node"))
            + ("" if loc.get("status") == "loaded" else f" ({loc.get('status')})")
            for loc in e.get("locations") or ()
            if isinstance(loc, dict)
        ]
        rows.append(
            [
                str(e.get("id", "?")),
                str(e.get("engine", "auto")),
                _gb(int(e.get("memory_mb") or 0)),
                ", ".join(locs) or "-",
                ", ".join(map(str, e.get("feasible_on") or ())) or ("-" if "feasible_on" in e else "?"),
                ", ".join(map(str, e.get("aliases") or ())) or "-",
                ", ".join(map(str, e.get("pinned_on") or ())) or "-",
            ]
        )
    return _table(rows) if len(rows) > 1 else "the catalogue is empty"


def _describe(result: Any, fallback: str) -> str:
    if isinstance(result, dict):
        if isinstance(result.get("message"), str):
            return str(result["message"])
        node = result.get("node_name") or result.get("node")
        status = result.get("status")
        if node or status:
            return f"{fallback}: {status or 'ok'}" + (f" on {node}" if node else "")
    return fallback


def new_key() -> str:
    """A new random mesh key (`mesh.auth.new_key` when the mesh provides one)."""
    try:
        auth = importlib.import_module("helexa.mesh.gossip.auth")
    except ImportError:
        auth = None
    maker: Callable[[], str] | None = getattr(auth, "new_key", None)
    return maker() if maker is not None else secrets.token_urlsafe(32)


# --- commands ----------------------------------------------------------------------------------


async def _status(client: AgentClient, args: argparse.Namespace) -> int:
    state = await client.state()
    if args.json:
        _dump(state)
    else:
        print(format_status(state, client.url))
    return EXIT_OK


async def _models(client: AgentClient, args: argparse.Namespace) -> int:
    if args.models_command == "list":
        entries = await client.catalogue()
        if args.json:
            _dump(entries)
        else:
            print(format_catalogue(entries))
        return EXIT_OK
    if args.models_command == "add":
        entry: dict[str, Any] = {"id": args.id, "source": args.source or args.id, "engine": args.engine}
        optional = {
            "memory_mb": args.memory_mb,
            "min_devices": args.min_devices,
            "min_device_memory_mb": args.min_device_memory_mb,
            "quant": args.quant,
            "revision": args.revision,
            "keep_alive": args.keep_alive,
            "context_length": args.context_length,
        }
        entry.update({k: v for k, v in optional.items() if v is not None})
        if args.alias:
            entry["aliases"] = args.alias
        if args.pinned_on:
            entry["pinned_on"] = args.pinned_on
        if args.resident:
            entry["resident"] = True
        if args.preload:
            entry["preload"] = True
        result = await client.put_entry(entry)
        print(_describe(result, f"added {args.id}"))
        return EXIT_OK
    result = await client.delete_entry(args.id)
    print(_describe(result, f"removed {args.id}"))
    return EXIT_OK


async def _load(client: AgentClient, args: argparse.Namespace) -> int:
    if args.command == "load":
        result = await client.load(args.model, args.node)
        print(_describe(result, f"load {args.model}"))
    else:
        result = await client.unload(args.model, args.node)
        print(_describe(result, f"unload {args.model}"))
    return EXIT_OK


async def _read_line(prompt: str) -> str | None:
    sys.stdout.write(prompt)
    sys.stdout.flush()
    line = await asyncio.to_thread(sys.stdin.readline)
    return line.rstrip("\n") if line else None


async def _chat(client: AgentClient, args: argparse.Namespace) -> int:
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    prompt: str | None = " ".join(args.prompt) if args.prompt else None
    repl = prompt is None
    while True:
        if repl:
            prompt = await _read_line("> ")
            if prompt is None or not prompt.strip() or prompt.strip() in {"/exit", "/quit"}:
                return EXIT_OK
        assert prompt is not None
        messages.append({"role": "user", "content": prompt})
        reply: list[str] = []
        started = time.monotonic()
        async for delta in client.chat_stream(args.model, messages):
            reply.append(delta)
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        logger.debug("reply in %.2f s", time.monotonic() - started)
        messages.append({"role": "assistant", "content": "".join(reply)})
        if not repl:
            return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--agent",
        metavar="URL",
        default=argparse.SUPPRESS,
        help=f"agent to talk to (default $HELEXA_AGENT or {DEFAULT_AGENT_URL})",
    )
    common.add_argument(
        "--mesh-key",
        metavar="KEY",
        default=argparse.SUPPRESS,
        help="the mesh key, for load/unload/models on a keyed mesh (default $HELEXA_MESH_KEY)",
    )
    common.add_argument(
        "--api-key",
        metavar="KEY",
        default=argparse.SUPPRESS,
        help="a client API key, for chat on an agent that requires one (default $HELEXA_API_KEY)",
    )
    parser = argparse.ArgumentParser(
        prog="helexa", description="Operate a helexa mesh through one of its agents."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("status", parents=[common], help="the fleet as a table")
    p.add_argument("--json", action="store_true", help="print the /mesh/state JSON")

    p = sub.add_parser("models", parents=[common], help="the catalogue: list, add, remove")
    msub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    lp = msub.add_parser("list", parents=[common], help="list catalogue entries")
    lp.add_argument("--json", action="store_true")
    ap = msub.add_parser("add", parents=[common], help="add or update an entry")
    ap.add_argument("id")
    ap.add_argument("--source", help="HF repo id, HF:// MLC repo, or a path on the agent (default: the id)")
    ap.add_argument("--engine", default="auto", choices=["auto", "mlc", "transformers", "fake"])
    ap.add_argument("--memory-mb", type=int)
    ap.add_argument("--min-devices", type=int)
    ap.add_argument("--min-device-memory-mb", type=int)
    ap.add_argument("--quant")
    ap.add_argument("--revision")
    ap.add_argument("--keep-alive", help='e.g. "30m", "0", "-1"')
    ap.add_argument("--context-length", type=int)
    ap.add_argument("--alias", action="append", default=[], help="repeatable")
    ap.add_argument("--pinned-on", action="append", default=[], metavar="NODE", help="repeatable")
    ap.add_argument("--resident", action="store_true")
    ap.add_argument("--preload", action="store_true")
    rp = msub.add_parser("remove", parents=[common], help="remove an entry")
    rp.add_argument("id")

    for name, what in (("load", "load a model"), ("unload", "unload a model")):
        p = sub.add_parser(name, parents=[common], help=what)
        p.add_argument("model")
        p.add_argument("--node", help="node name or id (default: the mesh decides / every node)")

    sub.add_parser("key", help="print a new random mesh key")

    p = sub.add_parser("chat", parents=[common], help="stream a reply, or a REPL without a prompt")
    p.add_argument("model")
    p.add_argument("prompt", nargs="*")
    p.add_argument("--system", help="a system message")
    return parser


async def _run(args: argparse.Namespace) -> int:
    async with AgentClient(
        agent_url(getattr(args, "agent", None)),
        mesh_key=getattr(args, "mesh_key", None) or os.environ.get("HELEXA_MESH_KEY"),
        api_key=getattr(args, "api_key", None) or os.environ.get("HELEXA_API_KEY"),
    ) as client:
        if args.command == "status":
            return await _status(client, args)
        if args.command == "models":
            return await _models(client, args)
        if args.command in {"load", "unload"}:
            return await _load(client, args)
        return await _chat(client, args)


def main(argv: Sequence[str]) -> int:
    """`helexa <command> ...` (argv includes the command name)."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exc:  # argparse: --help is 0, bad usage 2
        return int(exc.code or 0)
    if args.command == "key":
        print(new_key())
        return EXIT_OK
    try:
        return asyncio.run(_run(args))
    except AgentError as exc:
        print(f"helexa: error: {exc}", file=sys.stderr)
        return EXIT_AGENT_ERROR
    except AgentUnreachable as exc:
        print(f"helexa: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return 130
