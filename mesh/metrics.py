"""Prometheus metrics of one agent: every family operators build dashboards on, in one registry.

Each `Metrics` owns its own `CollectorRegistry` (not the process-global one), so several agents can live
in one test process. Families (names are a contract; label sets in braces):

    helexa_requests_total{model,node,route,status}        route: local|forwarded; status: HTTP code
    helexa_request_duration_seconds{model,route}          histogram
    helexa_time_to_first_token_seconds{model,cold}        histogram; cold: true|false
    helexa_inter_token_latency_seconds{model}             histogram
    helexa_tokens_total{model,kind}                       kind: prompt|completion
    helexa_model_loads_total{model,result}                result: ok|error
    helexa_model_load_duration_seconds{model}             histogram
    helexa_model_unloads_total{model}
    helexa_evictions_total{reason}                        reason: memory (room for another model)|idle
    helexa_in_flight_requests{model}                      gauge
    helexa_queued_requests{model}                         gauge
    helexa_peers{state}                                   gauge; state: alive|suspect|dead
    helexa_gossip_rounds_total
    helexa_gossip_bytes_total
    helexa_device_memory_used_bytes{device}               gauge
    helexa_device_memory_total_bytes{device}              gauge
    helexa_device_utilization_ratio{device}               gauge, 0..1

Others record through the small typed methods below (never through the prometheus objects), so the
label sets stay consistent. `render()` is the `/metrics` body (`CONTENT_TYPE`). State that lives
elsewhere and changes all the time (gossip counters, peer liveness, the last hardware sample) is copied
in by *refreshers* (`add_refresher`) that `render()` runs first: each reads cached state synchronously,
so a scrape is always current and never waits on the engine or the network.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Final, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST

Route = Literal["local", "forwarded"]
LoadResult = Literal["ok", "error"]
PeerState = Literal["alive", "suspect", "dead"]
PEER_STATES: Final[tuple[PeerState, ...]] = ("alive", "suspect", "dead")

# Whole requests: from a warm short answer (milliseconds) to a long generation behind a cold load.
REQUEST_BUCKETS_S: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
# Time to first token: tens of ms warm; a cold load can take minutes.
TTFT_BUCKETS_S: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Between tokens: ~1 ms (small models on a big GPU) to ~1 s (a large model on CPU).
INTER_TOKEN_BUCKETS_S: Final = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0)
# Loads: a tiny model from page cache in under a second; a download of tens of GB in many minutes.
LOAD_BUCKETS_S: Final = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class Metrics:
    """The agent's metrics. `node` is this agent's node name (default `node` label of requests)."""

    def __init__(self, *, node: str = "local") -> None:
        self.node = node
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._requests = Counter(
            "helexa_requests", "Requests answered", ("model", "node", "route", "status"), registry=r
        )
        self._request_duration = Histogram(
            "helexa_request_duration_seconds",
            "Whole request duration, first byte in to last byte out",
            ("model", "route"),
            buckets=REQUEST_BUCKETS_S,
            registry=r,
        )
        self._ttft = Histogram(
            "helexa_time_to_first_token_seconds",
            "Request arrival to first generated token (cold = the model had to be loaded)",
            ("model", "cold"),
            buckets=TTFT_BUCKETS_S,
            registry=r,
        )
        self._inter_token = Histogram(
            "helexa_inter_token_latency_seconds",
            "Time between consecutive streamed deltas",
            ("model",),
            buckets=INTER_TOKEN_BUCKETS_S,
            registry=r,
        )
        self._tokens = Counter("helexa_tokens", "Tokens processed", ("model", "kind"), registry=r)
        self._loads = Counter("helexa_model_loads", "Model loads by result", ("model", "result"), registry=r)
        self._load_duration = Histogram(
            "helexa_model_load_duration_seconds",
            "Model load duration (weights resolved, loaded, warmed up)",
            ("model",),
            buckets=LOAD_BUCKETS_S,
            registry=r,
        )
        self._unloads = Counter("helexa_model_unloads", "Model unloads", ("model",), registry=r)
        self._evictions = Counter("helexa_evictions", "Models evicted", ("reason",), registry=r)
        self._in_flight = Gauge("helexa_in_flight_requests", "Requests being served", ("model",), registry=r)
        self._queued = Gauge("helexa_queued_requests", "Requests waiting for a model", ("model",), registry=r)
        self._peers = Gauge("helexa_peers", "Peers by liveness", ("state",), registry=r)
        self._gossip_rounds = Counter("helexa_gossip_rounds", "Gossip exchanges", registry=r)
        self._gossip_bytes = Counter("helexa_gossip_bytes", "Gossip bytes sent and received", registry=r)
        self._device_used = Gauge(
            "helexa_device_memory_used_bytes", "Device memory in use", ("device",), registry=r
        )
        self._device_total = Gauge(
            "helexa_device_memory_total_bytes", "Device memory in total", ("device",), registry=r
        )
        self._device_util = Gauge(
            "helexa_device_utilization_ratio", "Device utilisation, 0..1", ("device",), registry=r
        )
        for state in PEER_STATES:
            self._peers.labels(state).set(0)
        # What `gossip_totals` has already counted (the gossip's own counters are monotonic totals).
        self._gossip_rounds_seen = 0
        self._gossip_bytes_seen = 0
        self._refreshers: list[Callable[[], None]] = []

    # ---------------------------------------------------------------------------------------- requests

    def observe_request(
        self, *, model: str, route: Route, status: int, duration_s: float, node: str | None = None
    ) -> None:
        """One answered request (status = the HTTP status, or the error's status after a stream started)."""
        self._requests.labels(model, node or self.node, route, str(status)).inc()
        self._request_duration.labels(model, route).observe(duration_s)

    def observe_ttft(self, *, model: str, cold: bool, seconds: float) -> None:
        self._ttft.labels(model, "true" if cold else "false").observe(seconds)

    def observe_inter_token(self, *, model: str, seconds: float) -> None:
        self._inter_token.labels(model).observe(seconds)

    def add_tokens(self, *, model: str, prompt: int, completion: int) -> None:
        self._tokens.labels(model, "prompt").inc(prompt)
        self._tokens.labels(model, "completion").inc(completion)

    # ------------------------------------------------------------------------------------------ models

    def model_loaded(self, *, model: str, result: LoadResult, duration_s: float) -> None:
        self._loads.labels(model, result).inc()
        self._load_duration.labels(model).observe(duration_s)

    def model_unloaded(self, *, model: str) -> None:
        self._unloads.labels(model).inc()

    def evicted(self, *, reason: str) -> None:
        """The agent unloaded a model on its own: `memory` (to make room for another model) or `idle`
        (its keep_alive ran out). Operator unloads and faults are not evictions."""
        self._evictions.labels(reason).inc()

    def set_model_load(self, *, model: str, in_flight: int, queued: int) -> None:
        self._in_flight.labels(model).set(in_flight)
        self._queued.labels(model).set(queued)

    def forget_model(self, *, model: str) -> None:
        """Drop a model's gauges (after unload), so stale series do not linger."""
        for gauge in (self._in_flight, self._queued):
            with contextlib.suppress(KeyError):
                gauge.remove(model)

    # ------------------------------------------------------------------------------------- mesh, devices

    def set_peers(self, counts: Mapping[PeerState, int]) -> None:
        for state in PEER_STATES:
            self._peers.labels(state).set(counts.get(state, 0))

    def gossip_round(self, *, bytes_total: int) -> None:
        """One gossip exchange moving `bytes_total` bytes (sent + received)."""
        self._gossip_rounds.inc()
        self._gossip_bytes.inc(bytes_total)

    def gossip_totals(self, *, rounds: int, bytes_total: int) -> None:
        """Catch up with the gossip's own running totals (rounds run, bytes sent + received).

        Counts the increase since the last call; totals that went backwards (a new gossip object) are
        taken as the new baseline, so the counters never decrease."""
        if rounds > self._gossip_rounds_seen:
            self._gossip_rounds.inc(rounds - self._gossip_rounds_seen)
        if bytes_total > self._gossip_bytes_seen:
            self._gossip_bytes.inc(bytes_total - self._gossip_bytes_seen)
        self._gossip_rounds_seen = rounds
        self._gossip_bytes_seen = bytes_total

    def set_device(
        self, *, device: str, used_bytes: int, total_bytes: int, utilization_ratio: float | None = None
    ) -> None:
        self._device_used.labels(device).set(used_bytes)
        self._device_total.labels(device).set(total_bytes)
        if utilization_ratio is not None:
            self._device_util.labels(device).set(utilization_ratio)

    # ------------------------------------------------------------------------------------------ output

    def add_refresher(self, refresh: Callable[[], None]) -> None:
        """Run `refresh()` before every `render()`: it copies cached state in (synchronous, cheap)."""
        self._refreshers.append(refresh)

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry (refreshers first; one failing is logged)."""
        for refresh in list(self._refreshers):
            try:
                refresh()
            except Exception:
                log.exception("metrics refresher failed")
        return generate_latest(self.registry)
