"""Operator commands against a running agent (over `mesh.client.AgentClient`).

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
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from helexa.mesh.client import (
    DEFAULT_AGENT_URL,
    AgentClient,
    AgentError,
    AgentUnreachable,
    agent_url,
)
from helexa.mesh.gossip.auth import new_key

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_AGENT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

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
