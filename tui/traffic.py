"""Traffic history derived from successive fleet states (pure; no widgets).

What `/mesh/state` publishes per model per node: `tokens_per_s`, `in_flight`, `queued`, `last_used`,
`requests_total`, `ttft_s`. From those, per model and per node, over the last few minutes in fixed buckets:

- tokens/s: the sum of the published decode rates (exact);
- busy: in-flight + queued, averaged over the bucket (exact);
- requests/s: from `requests_total` deltas when an agent publishes that counter; otherwise a lower
  bound from how often `last_used` moved between polls (several requests within one poll count once),
  marked as an estimate;
- time to first token: only when an agent publishes `ttft_s` (once it has timed a request).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .fleet import FleetState

# 36 buckets of 5 s: three minutes of history in a sparkline 36 cells wide; a cell changes at most
# once per bucket, which keeps redraws rare on large fleets.
BUCKET_S = 5.0
BUCKETS = 36

SPARK_CHARS = "▁▂▃▄▅▆▇█"


@dataclass(frozen=True, kw_only=True, slots=True)
class Sample:
    tokens_per_s: float = 0.0
    busy: float = 0.0
    requests: float = 0.0  # requests seen in this interval (or counter delta)
    ttft_s: float | None = None


@dataclass(kw_only=True, slots=True)
class _Acc:
    n: int = 0
    tokens_per_s: float = 0.0
    busy: float = 0.0
    requests: float = 0.0
    ttft_sum: float = 0.0
    ttft_n: int = 0

    def add(self, s: Sample) -> None:
        self.n += 1
        self.tokens_per_s += s.tokens_per_s
        self.busy += s.busy
        self.requests += s.requests
        if s.ttft_s is not None:
            self.ttft_sum += s.ttft_s
            self.ttft_n += 1


@dataclass(frozen=True, kw_only=True, slots=True)
class Bucket:
    tokens_per_s: float
    busy: float
    requests_per_s: float
    ttft_s: float | None


@dataclass(kw_only=True, slots=True)
class Series:
    """One subject's history (a model mesh-wide, or a node)."""

    buckets: deque[Bucket] = field(default_factory=lambda: deque(maxlen=BUCKETS))
    current: _Acc = field(default_factory=_Acc)
    last: Sample = field(default_factory=Sample)


class TrafficHistory:
    """Feed it every state (`observe`); read `models`/`nodes` series for sparklines."""

    def __init__(self, *, bucket_s: float = BUCKET_S) -> None:
        self.bucket_s = bucket_s
        self.models: dict[str, Series] = {}
        self.nodes: dict[str, Series] = {}
        self.exact_requests = False  # True once some agent publishes `requests_total`
        self.has_ttft = False
        self._bucket_start: float | None = None
        self._last_used: dict[tuple[str, str], float] = {}
        self._counters: dict[tuple[str, str], int] = {}

    def observe(self, state: FleetState, now_s: float) -> bool:
        """Record one state. Returns True when a bucket closed (sparklines changed)."""
        closed = False
        if self._bucket_start is None:
            self._bucket_start = now_s
        elif now_s - self._bucket_start >= self.bucket_s:
            for series in (*self.models.values(), *self.nodes.values()):
                self._close(series)
            self._bucket_start = now_s
            closed = True
        per_model: dict[str, list[Sample]] = {}
        for node in state.nodes:
            node_samples: list[Sample] = []
            for m in node.models:
                key = (node.id, m.id)
                requests = 0.0
                if m.requests_total is not None:
                    self.exact_requests = True
                    before = self._counters.get(key)
                    self._counters[key] = m.requests_total
                    if before is not None and m.requests_total >= before:
                        requests = float(m.requests_total - before)
                else:
                    before_used = self._last_used.get(key)
                    self._last_used[key] = m.last_used
                    if before_used is not None and m.last_used > before_used:
                        requests = 1.0
                if m.ttft_s is not None:
                    self.has_ttft = True
                sample = Sample(
                    tokens_per_s=m.tokens_per_s or 0.0,
                    busy=float(m.in_flight + m.queued),
                    requests=requests,
                    ttft_s=m.ttft_s,
                )
                node_samples.append(sample)
                per_model.setdefault(m.id, []).append(sample)
            self._add(self.nodes, node.id, _sum(node_samples))
        for model_id, samples in per_model.items():
            self._add(self.models, model_id, _sum(samples))
        return closed

    def _add(self, table: dict[str, Series], key: str, sample: Sample) -> None:
        series = table.get(key)
        if series is None:
            series = table[key] = Series()
        series.current.add(sample)
        series.last = sample

    def _close(self, series: Series) -> None:
        acc = series.current
        n = max(1, acc.n)
        series.buckets.append(
            Bucket(
                tokens_per_s=acc.tokens_per_s / n,
                busy=acc.busy / n,
                requests_per_s=acc.requests / self.bucket_s,
                ttft_s=acc.ttft_sum / acc.ttft_n if acc.ttft_n else None,
            )
        )
        series.current = _Acc()


def _sum(samples: list[Sample]) -> Sample:
    ttfts = [s.ttft_s for s in samples if s.ttft_s is not None]
    return Sample(
        tokens_per_s=sum(s.tokens_per_s for s in samples),
        busy=sum(s.busy for s in samples),
        requests=sum(s.requests for s in samples),
        ttft_s=sum(ttfts) / len(ttfts) if ttfts else None,
    )


def sparkline(values: list[float], width: int = BUCKETS) -> str:
    """Block characters scaled to the series' own maximum, right-aligned in `width` cells."""
    values = values[-width:]
    top = max(values, default=0.0)
    if top <= 0:
        chars = "▁" * len(values)
    else:
        last = len(SPARK_CHARS) - 1
        chars = "".join(SPARK_CHARS[min(last, round(v / top * last))] for v in values)
    return chars.rjust(width)
