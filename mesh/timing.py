"""Protocol timings and limits of the mesh, as named values with the reason for each.

Like python-zeroconf's `const.py`: every named timing of the agent lives here, each with why it is what it
is, and tests shrink them (`MeshTiming.scaled(0.1)`, `NeuronTiming`, app keys) instead of sleeping
through production timeouts. The mesh objects (`Gossip`, `FailureDetector`, the proxy) take a
`MeshTiming`; nothing reads these constants behind their backs except as defaults.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# --- gossip -----------------------------------------------------------------------------------------

# One exchange per second: with push-pull and fanout 3 a change reaches 100 agents in 2-3 rounds, inside
# the "about 2 s for 3-50 hosts, 5 s for 100" target (scripts/bench_gossip_sim.py).
GOSSIP_INTERVAL_S = 1.0
# Peers contacted per round. With push-pull every agent also answers ~fanout exchanges per round, so it
# takes part in ~2 x fanout exchanges a second; 3 converges in ~log3(N) rounds and survives a dead pick or
# two in the same round. Bytes grow linearly with it (compact digests keep each exchange small).
GOSSIP_FANOUT = 3
# Compact digests (gossip protocol 2): a digest is the hash of the view's (node id, generation) set plus
# positional vectors of versions and heartbeats written a few characters per node, instead of
# [id, generation, version, heartbeat] per node (~60 B each). Views whose node sets differ (joins,
# restarts, forgets) fall back to the explicit digest for that exchange. False only to measure the old
# protocol (`scripts/bench_gossip_sim.py --modes old,new`).
COMPACT_DIGESTS = True
# Every Nth round one of the exchanges also carries a repair check. Compact: a 48-bit content hash per
# record (8 B each), and the records whose content differs under equal (generation, version) are swapped;
# that is cheap, so every 30 s. Explicit digests (the old protocol): a full exchange of every record both
# ways (~2 x N records), affordable only every ~2 minutes. Either way it is a safety net (two different
# records under one (generation, version) only come from a bug or a forger), not the mechanism.
FULL_EXCHANGE_EVERY_ROUNDS = 30
# Dead (not left) peers are retried this often so a healed partition converges again: mDNS does not
# re-announce a peer it has already seen, and static peers may be empty.
RECONNECT_DEAD_EVERY_ROUNDS = 2
# One exchange with one peer, both HTTP round trips together. Below the interval so a slow peer never
# delays the next round; a LAN round trip is well under 10 ms.
GOSSIP_PEER_TIMEOUT_S = 0.8
# Graceful leave is pushed to every live peer once, bounded so shutdown is never held up by a dead one.
LEAVE_TIMEOUT_S = 1.0
# Unanswered seeds (static peers, mDNS hints) are retried with doubling backoff up to this: a peer that
# is down for a while is still found within half a minute of coming back.
SEED_BACKOFF_MAX_S = 30.0
# A gossip message larger than this is refused (100 nodes x a few KB each fits many times over).
MAX_GOSSIP_MESSAGE_BYTES = 16 * 1024 * 1024

# --- failure detection ------------------------------------------------------------------------------

# No heartbeat advance for 3 s (three missed rounds, never one) → suspect: still listed, not preferred.
SUSPECT_AFTER_S = 3.0
# No advance for 8 s → dead and out of routing; with gossip lag of ~1-2 s a crashed peer leaves routing
# within the 10 s target.
DEAD_AFTER_S = 8.0
# Dead or left peers are forgotten (record dropped) after 5 minutes: long enough for the dashboard to
# show what happened and for every agent to agree, short enough that a renamed fleet cleans up.
FORGET_AFTER_S = 300.0
# A forgotten record's (generation, version) is remembered this long so a peer that still holds the stale
# record cannot resurrect it by gossiping it back.
TOMBSTONE_S = 600.0
# If our own loop stalled longer than this between detector ticks (GC, suspended VM, blocked loop), the
# silence was ours: the gap is credited to every peer instead of declaring the whole fleet dead.
MAX_TICK_GAP_S = 2.5

# --- fleet view -------------------------------------------------------------------------------------

# Preload waits this many gossip intervals after start so the fleet view has settled (peers known,
# their models visible) before deciding which single node loads a `preload` entry.
PRELOAD_SETTLE_ROUNDS = 3
# Count-only changes of this node's record (requests in flight, totals, rates) are published at most every
# this many gossip intervals (`Fleet.counts_interval_s`; 2 s in production): fresh enough for least-busy
# routing and the dashboard, without re-gossiping a busy agent's whole record on every round.
COUNTS_PUBLISH_ROUNDS = 2
# A peer's repeated change of the same kind (suspect again, alive again...) within this window is logged
# at debug: a flapping peer gets one warning per kind of change, not one per round.
PEER_LOG_QUIET_S = 300.0
# Count-only changes of this node's record are published at most this often. Two gossip intervals: the
# counters feed least-busy routing and the dashboard, which a 2 s old figure serves as well as a fresh
# one, while a busy agent's record is no longer re-sent whole on every round (see the module doc).
COUNTS_INTERVAL_S = 2.0

# --- security ---------------------------------------------------------------------------------------

# Accepted clock skew for signed peer requests. NTP keeps LAN hosts well inside this.
AUTH_MAX_SKEW_S = 30.0
# Generations are start times in ms. A record whose generation is further than this ahead of this host's
# clock cannot be real (or its host's clock is badly wrong): it is dropped, and never refuted by jumping
# this node's own generation past it (a forged generation of 2^63 - 1 made a node answer with 2^63,
# which no peer could decode). An hour covers clock drift and steps on hosts without NTP; a keyed mesh
# already needs clocks within AUTH_MAX_SKEW_S.
GENERATION_MAX_AHEAD_S = 3600.0
# Nonces remembered for replay detection (entries expire after 2x the skew window). 64k nonces is a few
# MB and covers far more than the fleet's gossip and forwarding rate within a minute.
NONCE_CACHE_SIZE = 65536

# --- forwarding -------------------------------------------------------------------------------------

# Connecting to a LAN peer takes milliseconds; 3 s covers a busy host and still lets the caller move to
# the next candidate quickly.
PROXY_CONNECT_TIMEOUT_S = 3.0
# Read-idle (stall) timeout on a forwarded request. Serving agents send SSE keep-alive comments during
# loads and prefill, so a stream silent this long is a stalled peer. There is deliberately no total
# timeout: long answers must not be cut. Non-streamed requests that may think longer pass their own.
PROXY_STALL_TIMEOUT_S = 60.0

# A serving agent answers a forwarded request, or starts its response (SSE keep-alives for a stream,
# whitespace for a non-streamed one, see below), within one keep-alive interval (1 s). A peer that sends
# no response at all for this long is frozen (SIGSTOP, a wedged loop): the request has not started there,
# so it is retried on the next candidate instead of waiting out the freeze.
PEER_RESPONSE_START_TIMEOUT_S = 5.0
# A non-streamed forward is answered with a space every `FORWARD_KEEPALIVE_INTERVAL_S` while the serving
# agent works (a cold load, a long generation; `mesh.server.peer_routes`), then the answer. So a stall
# timeout can bound it like a stream's: ten missed keep-alives is a stalled peer, not a slow answer. (It
# was 900 s, to cover a whole cold load plus generation with nothing sent: a frozen peer held requests
# for 15 minutes.)
NON_STREAM_STALL_TIMEOUT_S = 10.0
FORWARD_KEEPALIVE_INTERVAL_S = 1.0

# --- events -----------------------------------------------------------------------------------------

# Per-subscriber queue of `/mesh/events`; a subscriber this far behind loses its oldest events.
EVENT_QUEUE_SIZE = 1000
# Recent events replayed to a new subscriber, so a dashboard opening shows some history.
EVENT_HISTORY_SIZE = 100
# SSE comment keep-alive on an idle event stream (proxies and clients with idle timers).
EVENT_KEEPALIVE_S = 15.0

# --- the agent, its HTTP edge and its client ---------------------------------------------------------

# Long enough for a short answer in progress to finish, short enough that systemd's default stop
# timeout (90 s) never has to SIGKILL us.
DEFAULT_DRAIN_TIMEOUT_S = 30.0
# How often the sampler refreshes live free memory. Placement reads it; a second is fresh enough for a
# decision that is re-checked by the target agent anyway, and NVML queries cost well under a millisecond.
HARDWARE_SAMPLE_INTERVAL_S = 2.0
# aiohttp's own bound on closing connections at shutdown. Streams were given the drain timeout before
# this point; what remains is cut quickly so a stop never ends in SIGKILL.
SHUTDOWN_TIMEOUT_S = 3.0
# Retry-After suggested when a model cannot be served right now but probably can soon (a load that
# failed transiently, a node draining): long enough not to hammer, short enough for interactive use.
DEFAULT_RETRY_AFTER_S = 5.0
# Clients with ~1 s idle timers dropped and retried during cold loads; one SSE comment a second keeps
# them. Tests shrink it (through `mesh.server.appkeys.KEEPALIVE_INTERVAL_S`).
SSE_KEEPALIVE_INTERVAL_S = 1.0
# Operator calls are small and read cached state: a generous total bound is enough for them. A load is
# different: the agent answers `POST /mesh/models/load` once the model *is loaded* (a download can take
# many minutes, with nothing sent meanwhile), so that call has only the connect bound.
CLIENT_REQUEST_TIMEOUT_S = 600.0
CLIENT_CONNECT_TIMEOUT_S = 5.0

# --- the HTTP server's own bounds (`mesh.server.connections`; tests pass a shrunk `ServerLimits`) -----

# An idle keep-alive connection, or one whose client is still sending a request's headers, is closed after
# this (aiohttp's keep-alive timer, which also runs from the moment a connection opens; its default is an
# hour, and 600 idle or slow-header connections were all held). Longer than the idle expiry of the
# clients' connection pools (httpx, under the openai SDK: 5 s; aiohttp, our peers: 15 s), so a client
# always drops an idle connection before we close it and never sends a request onto one being closed.
# Behind a reverse proxy that keeps upstream connections longer (nginx: 60 s) set `http_idle_timeout_s`
# above the proxy's.
HTTP_IDLE_TIMEOUT_S = 20.0
# A request's body must arrive in full within this once its headers have (408 otherwise): a full 16 MiB
# body needs only ~4.5 Mbit/s, and a client trickling its body holds a connection no longer than this.
REQUEST_BODY_TIMEOUT_S = 30.0
# A client that leaves our send buffers full this long has stopped reading: its connection is closed,
# which ends its request and releases the model it held (a stalled reader held its reservation forever).
# Streams carry a keep-alive a second, so a live client is always reading; 30 s forgives a stalled link.
WRITE_STALL_TIMEOUT_S = 30.0
# Per-connection send buffer (SO_SNDBUF). With the kernel's autotuning a client that stopped reading can
# leave megabytes queued before our own buffer fills and the write stall timer starts (a slow token
# stream fills that in many minutes); 256 KiB still carries 2 Gbit/s at a LAN's 1 ms round trip, far more
# than any answer needs.
HTTP_SEND_BUFFER_BYTES = 256 * 1024
# After answering a request whose body was not read in full (a 413, a 408), its remaining bytes are read
# and dropped this long at most, so a client still sending sees the answer; a slow one is not waited for.
HTTP_LINGER_S = 2.0
# Client connections open at once; past this a new connection is answered 503 + Retry-After and closed,
# so a flood of connections cannot exhaust file descriptors (or memory) that peers and models need. It is
# also capped at half the process's file-descriptor limit, which `helexa agent` raises to the hard limit
# at start. 2048 leaves room for a thousand concurrent streams through one agent, twice over.
MAX_CONNECTIONS = 2048
# A refused connection is answered when its request arrives, or after this if none does.
REFUSED_CONNECTION_WAIT_S = 1.0

# --- serving (the neuron's defaults; `NeuronTiming` overrides them per agent) -----------------------

# After a transient load failure (download, race with another process for memory) the next request may
# retry this soon; doubled per consecutive failure up to the maximum. Short enough that a client retry
# after Retry-After succeeds once the cause is gone.
LOAD_RETRY_BACKOFF_S = 2.0
LOAD_RETRY_BACKOFF_MAX_S = 60.0
# Structural failures (missing weights, bad config) do not fix themselves: wait this long before trying
# again, so a broken entry that clients keep asking for costs one load attempt a minute, not hundreds.
STRUCTURAL_RETRY_BACKOFF_S = 60.0
# The keep-alive reaper's tick. keep_alive values are minutes in practice; a second of slack is nothing.
REAPER_INTERVAL_S = 1.0
# Bound on unloading one model at shutdown (a wedged engine must not hold the exit forever).
UNLOAD_TIMEOUT_S = 10.0

# --- discovery --------------------------------------------------------------------------------------

# How long to wait for a browsed service's SRV/TXT/A records (milliseconds, zeroconf's unit).
MDNS_RESOLVE_TIMEOUT_MS = 3000
# RFC 6763 advises keeping TXT records small; the mission says well under 400 bytes.
MDNS_TXT_MAX_BYTES = 300


@dataclass(frozen=True, kw_only=True, slots=True)
class MeshTiming:
    """The timings one agent's mesh objects run with. Tests pass a shrunk copy."""

    gossip_interval_s: float = GOSSIP_INTERVAL_S
    gossip_fanout: int = GOSSIP_FANOUT
    compact_digests: bool = COMPACT_DIGESTS
    full_exchange_every_rounds: int = FULL_EXCHANGE_EVERY_ROUNDS
    reconnect_dead_every_rounds: int = RECONNECT_DEAD_EVERY_ROUNDS
    gossip_peer_timeout_s: float = GOSSIP_PEER_TIMEOUT_S
    leave_timeout_s: float = LEAVE_TIMEOUT_S
    suspect_after_s: float = SUSPECT_AFTER_S
    dead_after_s: float = DEAD_AFTER_S
    forget_after_s: float = FORGET_AFTER_S
    tombstone_s: float = TOMBSTONE_S
    max_tick_gap_s: float = MAX_TICK_GAP_S

    def scaled(self, factor: float) -> MeshTiming:
        """Every duration multiplied by `factor` (counts unchanged): `DEFAULT_TIMING.scaled(0.1)`."""
        changes = {
            f.name: getattr(self, f.name) * factor for f in dataclasses.fields(self) if f.name.endswith("_s")
        }
        return dataclasses.replace(self, **changes)


DEFAULT_TIMING = MeshTiming()
