"""Fleet state → table rows (pure). Each row has a stable key, so tables can diff and touch only the
cells that changed. Row keys: `n:<node>`, `d:<node>:<device>`, `m:<node>:<model>` (topology),
`c:<model>` (catalogue), `tm:<model>` / `tn:<node>` (traffic).

Topology rows are lazy: a row carries the (frozen) views its cells are made from, and the cells are
built only when a table needs them. A 50-node fleet has some 550 topology rows, of which a terminal
shows about 40; comparing views is much cheaper than building cells, so unchanged and off-screen rows
cost almost nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rich.text import Text

from .fleet import DeviceView, FleetState, ModelView, NodeView, transfer
from .traffic import Series, TrafficHistory, sparkline

Cell = str | Text
Cells = tuple[Cell, ...]


def _given(cells: Cells) -> Cells:
    return cells


@dataclass(frozen=True, slots=True)
class Row:
    """One table row: a stable key, and cells made by `build(*inputs)` when needed.

    Equal `inputs` make equal cells (builders are pure), so tables compare inputs to find changed rows.
    """

    key: str
    build: Callable[..., Cells]
    inputs: tuple[object, ...]

    @property
    def cells(self) -> Cells:
        return self.build(*self.inputs)

    @classmethod
    def of(cls, key: str, cells: Cells) -> Row:
        """A row whose cells are already built (small tables)."""
        return cls(key, _given, (cells,))


@dataclass(frozen=True, kw_only=True, slots=True)
class Column:
    key: str
    label: str
    width: int


TOPOLOGY_COLUMNS = (
    Column(key="name", label="Node / device / model", width=40),
    Column(key="where", label="Address / hardware", width=22),
    Column(key="state", label="State", width=12),
    Column(key="memory", label="Memory used / total", width=24),
    Column(key="util", label="Util", width=4),
    Column(key="temp", label="Temp", width=4),
    Column(key="reqs", label="Run/Q", width=5),
    Column(key="tps", label="Tok/s", width=6),
    Column(key="agent", label="Agent", width=6),
    Column(key="age", label="Up", width=6),
)

CATALOGUE_COLUMNS = (
    Column(key="model", label="Model", width=38),
    Column(key="memory", label="Memory", width=7),
    Column(key="loaded", label="Loaded on", width=22),
    Column(key="feasible", label="Could go to", width=24),
    Column(key="aliases", label="Aliases", width=14),
    Column(key="pinned", label="Pinned on", width=12),
)

TRAFFIC_COLUMNS = (
    Column(key="name", label="Model / node", width=34),
    Column(key="tps", label="Tok/s", width=7),
    Column(key="tps_spark", label="Tok/s, last 3 min", width=36),
    Column(key="busy", label="Busy", width=4),
    Column(key="req", label="Req/s", width=6),
    Column(key="req_spark", label="Requests, last 3 min", width=36),
    Column(key="ttft", label="TTFT", width=6),
)

LIVENESS_STYLE = {"alive": "green", "suspect": "yellow", "dead": "bold red", "left": "dim"}
STATUS_STYLE = {"loaded": "green", "loading": "cyan", "unloading": "yellow", "failed": "bold red"}


def short_gpu(name: str) -> str:
    for prefix in ("NVIDIA GeForce ", "NVIDIA "):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def mem_gb(mb: float) -> str:
    return f"{mb / 1024:.1f}"


def memory_bar(used_mb: int, total_mb: int, width: int = 8) -> Text:
    """`████░░░░ 12.0/24.0G`, coloured by how full it is."""
    ratio = used_mb / total_mb if total_mb > 0 else 0.0
    filled = min(width, round(ratio * width))
    colour = "green" if ratio < 0.7 else "yellow" if ratio < 0.9 else "red"
    text = Text("█" * filled, style=colour)
    text.append("░" * (width - filled), style="grey37")
    text.append(f" {mem_gb(used_mb)}/{mem_gb(total_mb)}G")
    return text


def age(seconds: float) -> str:
    """Coarse on purpose (cells change rarely): 42s, 17m, 3h12m, 2d04h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def percent(value: float | None) -> str:
    return "" if value is None else f"{value * 100:.0f}%"


def temperature(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}°"


def model_status(m: ModelView) -> Text:
    style = STATUS_STYLE.get(m.status, "")
    if m.status == "loading" and m.progress is not None:
        filled = min(5, round(m.progress * 5))
        text = f"{'▰' * filled}{'▱' * (5 - filled)} {m.progress * 100:3.0f}%"
        if m.phase == "downloading" and m.done_bytes is not None:
            text += " " + transfer(m.done_bytes, m.total_bytes, m.bytes_per_s, m.eta_s)
        return Text(text, style=style)
    if m.status == "loading" and m.phase is not None:
        return Text(m.phase, style=style)
    return Text(m.status, style=style)


def matches(needle: str, *haystack: str) -> bool:
    return not needle or any(needle in h.lower() for h in haystack)


def _node_cells(node: NodeView, up: str) -> Cells:
    total = sum(d.memory_total_mb for d in node.devices)
    used = sum(d.memory_used_mb for d in node.devices)
    utils = [d.utilization for d in node.devices if d.utilization is not None]
    in_flight = sum(m.in_flight for m in node.models)
    queued = sum(m.queued for m in node.models)
    tps = sum(m.tokens_per_s or 0.0 for m in node.models)
    liveness = node.liveness + (" drain" if node.draining else "")
    dead = node.liveness in ("dead", "left")
    return (
        Text(node.name, style="bold" if not dead else "bold strike"),
        f"{node.address}:{node.port}",
        Text(liveness, style=LIVENESS_STYLE.get(node.liveness, "")),
        memory_bar(used, total) if total else "",
        percent(sum(utils) / len(utils)) if utils else "",
        "",
        f"{in_flight}/{queued}" if node.models else "",
        f"{tps:.0f}" if node.models else "",
        node.agent_version,
        up,
    )


def _device_cells(d: DeviceView) -> Cells:
    return (
        Text(f"  {d.name}", style="dim"),
        short_gpu(d.model),
        "",
        memory_bar(d.memory_used_mb, d.memory_total_mb),
        percent(d.utilization),
        temperature(d.temperature_c),
        "",
        "",
        "",
        "",
    )


def _model_cells(m: ModelView) -> Cells:
    name = Text("  ◆ ", style=STATUS_STYLE.get(m.status, ""))
    name.append(m.id)
    if m.resident:
        name.append(" (resident)", style="dim")
    where = m.engine + (f" {','.join(m.devices)}" if m.devices else "")
    if m.status == "failed" and m.error:
        where = m.error
    return (
        name,
        Text(where, style="red") if m.status == "failed" else where,
        model_status(m),
        f"{mem_gb(m.memory_mb)}G" if m.memory_mb else "",
        "",
        "",
        f"{m.in_flight}/{m.queued}",
        f"{m.tokens_per_s:.0f}" if m.tokens_per_s is not None else "",
        "",
        "",
    )


def topology_rows(
    state: FleetState, *, now_s: float, needle: str = "", show_devices: bool = True
) -> list[Row]:
    """Nodes, each followed by its devices (unless hidden) and its models; lazy (see the module doc)."""
    rows: list[Row] = []
    needle = needle.lower()
    for node in state.nodes:
        node_match = matches(needle, node.name, node.address, node.id)
        models = [m for m in node.models if node_match or matches(needle, m.id)]
        if not node_match and not models:
            continue
        up = age(now_s - node.generation / 1000.0) if node.generation else ""
        rows.append(Row(f"n:{node.id}", _node_cells, (node, up)))
        if show_devices and node_match:
            rows.extend(Row(f"d:{node.id}:{d.name}", _device_cells, (d,)) for d in node.devices)
        rows.extend(Row(f"m:{node.id}:{m.id}", _model_cells, (m,)) for m in models)
    return rows


def _names(names: Sequence[str], limit: int = 4) -> str:
    if not names:
        return "-"
    shown = ", ".join(names[:limit])
    return shown + (f" +{len(names) - limit}" if len(names) > limit else "")


def catalogue_rows(state: FleetState, *, needle: str = "") -> list[Row]:
    rows: list[Row] = []
    needle = needle.lower()
    for e in state.catalogue:
        loaded = [state.node_name(loc.node) for loc in e.locations if loc.status == "loaded"]
        loading = [state.node_name(loc.node) for loc in e.locations if loc.status == "loading"]
        if not matches(needle, e.id, *e.aliases, *loaded, *loading, *e.feasible_on):
            continue
        where = Text(_names(loaded), style="green" if loaded else "dim")
        if loading:
            where.append(f" (loading: {_names(loading, 2)})", style="cyan")
        feasible = Text(_names(e.feasible_on)) if e.feasible_on else Text("nowhere", style="red")
        rows.append(
            Row.of(
                f"c:{e.id}",
                (
                    Text(e.id, style="bold") + (Text(" resident", style="dim") if e.resident else ""),
                    f"{mem_gb(e.memory_mb)}G" if e.memory_mb else "?",
                    where,
                    feasible,
                    ", ".join(e.aliases) or "-",
                    Text(", ".join(e.pinned_on), style="magenta") if e.pinned_on else "-",
                ),
            )
        )
    return rows


def traffic_rows(state: FleetState, history: TrafficHistory, *, needle: str = "") -> list[Row]:
    rows: list[Row] = []
    needle = needle.lower()
    estimate = "" if history.exact_requests else "≥"
    for model_id in sorted(history.models):
        if not matches(needle, model_id):
            continue
        series = history.models[model_id]
        rows.append(_traffic_row(f"tm:{model_id}", Text(model_id, style="bold"), series, estimate))
    for node in state.nodes:
        series_n = history.nodes.get(node.id)
        if series_n is None or not matches(needle, node.name):
            continue
        rows.append(
            _traffic_row(f"tn:{node.id}", Text(f"node {node.name}", style="cyan"), series_n, estimate)
        )
    return rows


def _traffic_row(key: str, label: Text, series: Series, estimate: str) -> Row:
    buckets = list(series.buckets)
    ttfts = [b.ttft_s for b in buckets if b.ttft_s is not None]
    last_rps = buckets[-1].requests_per_s if buckets else 0.0
    return Row.of(
        key,
        (
            label,
            f"{series.last.tokens_per_s:.0f}",
            Text(sparkline([b.tokens_per_s for b in buckets]), style="green"),
            f"{series.last.busy:.0f}",
            f"{estimate}{last_rps:.1f}",
            Text(sparkline([b.requests_per_s for b in buckets]), style="cyan"),
            f"{ttfts[-1] * 1000:.0f}ms" if ttfts else "n/a",
        ),
    )
