"""mDNS / DNS-SD discovery with python-zeroconf's asyncio API: advertise this agent, browse for others.

Every agent registers `_helexa._tcp.local.` with a small TXT record (protocol version, node id,
generation, mesh name, API port, GPU summary) and browses the same type. A seen service is only a *hint*
passed to `on_peer(PeerHint)`: mDNS cannot tell that a peer crashed and anyone on the LAN can forge it, so
the agent contacts the hinted address over HTTP (gossip) and liveness comes from there.

Never fatal: if multicast is unavailable (no interface, blocked socket, container without networking) the
failure is logged once and the agent runs on static peers. Everything runs on the event loop without
blocking it (zeroconf's asyncio API; resolves are awaited tasks).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from helexa.mesh.timing import MDNS_RESOLVE_TIMEOUT_MS, MDNS_TXT_MAX_BYTES

log = logging.getLogger(__name__)

__all__ = [
    "PROTOCOL_VERSION",
    "SERVICE_TYPE",
    "Discovery",
    "GpuSummary",
    "PeerHint",
    "build_txt",
    "parse_txt",
]

SERVICE_TYPE = "_helexa._tcp.local."
PROTOCOL_VERSION = "1"


@dataclass(frozen=True, kw_only=True, slots=True)
class GpuSummary:
    count: int = 0
    total_vram_mb: int = 0
    first_name: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class PeerHint:
    """A service seen on the LAN: where to contact it, and what it claims to be."""

    address: str
    port: int
    node_id: str
    mesh: str
    generation: int = 0
    protocol: str = PROTOCOL_VERSION


def build_txt(
    *,
    node_id: str,
    generation: int,
    mesh: str,
    port: int,
    gpus: GpuSummary,
    max_bytes: int = MDNS_TXT_MAX_BYTES,
) -> dict[str, str]:
    """The TXT properties, trimmed so the encoded record stays under `max_bytes` (the GPU name goes first)."""
    props = {
        "pv": PROTOCOL_VERSION,
        "id": node_id[:128],
        "gen": str(generation),
        "mesh": mesh[:63],
        "port": str(port),
        "gpus": str(gpus.count),
        "vram": str(gpus.total_vram_mb),
        "gpu0": gpus.first_name[:63],
    }
    while txt_size(props) > max_bytes and props["gpu0"]:
        props["gpu0"] = props["gpu0"][:-8]
    return props


def txt_size(props: dict[str, str]) -> int:
    """Bytes of the DNS TXT rdata: one length byte plus `key=value` per entry."""
    return sum(1 + len(k.encode()) + 1 + len(v.encode()) for k, v in props.items())


def parse_txt(props: dict[bytes, bytes | None]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in props.items():
        try:
            out[k.decode()] = (v or b"").decode()
        except UnicodeDecodeError:
            continue
    return out


class Discovery:
    """Advertise and browse; `await start()` and `await close()` from the agent's lifecycle.

    `interfaces`: None = all interfaces; tests pass `["127.0.0.1"]` and a unique `service_type`.
    `addresses`: the IPv4 addresses to advertise (the agent's advertise address).
    """

    def __init__(
        self,
        *,
        node_id: str,
        generation: int,
        mesh: str,
        port: int,
        addresses: Sequence[str],
        on_peer: Callable[[PeerHint], None],
        gpus: GpuSummary | None = None,
        instance_name: str | None = None,
        interfaces: Sequence[str] | None = None,
        service_type: str = SERVICE_TYPE,
    ) -> None:
        self.node_id = node_id
        self.generation = generation
        self.mesh = mesh
        self.port = port
        self.addresses = list(addresses)
        self.gpus = gpus or GpuSummary()
        self.service_type = service_type
        self.instance_name = (instance_name or f"helexa-{node_id}")[:63]
        self._on_peer = on_peer
        self._interfaces = list(interfaces) if interfaces is not None else None
        self._azc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.running = False
        self.error: str | None = None  # why discovery is off, for the dashboard

    def _service_info(self) -> AsyncServiceInfo:
        props = build_txt(
            node_id=self.node_id, generation=self.generation, mesh=self.mesh, port=self.port, gpus=self.gpus
        )
        return AsyncServiceInfo(
            self.service_type,
            f"{self.instance_name}.{self.service_type}",
            port=self.port,
            properties=props,
            parsed_addresses=self.addresses,
            server=f"{self.instance_name}.local.",
        )

    async def start(self) -> bool:
        """Browse and register. Returns False (and logs) if mDNS is unavailable; never raises.

        Takes a second or two (name probing); the agent runs it in the background after binding.
        """
        try:
            if self._interfaces is not None:
                self._azc = AsyncZeroconf(interfaces=self._interfaces, ip_version=IPVersion.V4Only)
            else:
                self._azc = AsyncZeroconf(ip_version=IPVersion.V4Only)
            self._browser = AsyncServiceBrowser(
                self._azc.zeroconf, [self.service_type], handlers=[self._on_state_change]
            )
            self._info = self._service_info()
            # Probing for name conflicts and the first announcements take ~1-2 s (awaited, not blocking).
            announced = await self._azc.async_register_service(self._info, allow_name_change=True)
            await announced
        except Exception as e:  # OSError (no multicast), zeroconf errors: discovery is optional
            self.error = f"{type(e).__name__}: {e}"
            log.warning("mDNS discovery unavailable (%s); using static peers only", self.error)
            await self._close_quietly()
            return False
        self.running = True
        log.info("mDNS: advertising %s on port %d", self.instance_name, self.port)
        return True

    async def update(self, *, generation: int | None = None, gpus: GpuSummary | None = None) -> None:
        """Re-announce with a changed TXT record."""
        if generation is not None:
            self.generation = generation
        if gpus is not None:
            self.gpus = gpus
        if self._azc is None or self._info is None:
            return
        try:
            new = AsyncServiceInfo(
                self.service_type,
                self._info.name,  # keep the (possibly renamed) registered name
                port=self.port,
                properties=build_txt(
                    node_id=self.node_id,
                    generation=self.generation,
                    mesh=self.mesh,
                    port=self.port,
                    gpus=self.gpus,
                ),
                parsed_addresses=self.addresses,
                server=self._info.server,
            )
            await (await self._azc.async_update_service(new))
            self._info = new
        except Exception:
            log.warning("mDNS: updating the advertisement failed", exc_info=True)

    def _on_state_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change not in (ServiceStateChange.Added, ServiceStateChange.Updated):
            return  # Removed: a goodbye is only a hint too; gossip decides liveness
        task = asyncio.get_running_loop().create_task(self._resolve(zeroconf, service_type, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, zeroconf: Zeroconf, service_type: str, name: str) -> None:
        try:
            info = AsyncServiceInfo(service_type, name)
            if not await info.async_request(zeroconf, MDNS_RESOLVE_TIMEOUT_MS):
                log.debug("mDNS: %s did not resolve", name)
                return
            props = parse_txt(info.properties)
            node_id = props.get("id", "")
            if not node_id or node_id == self.node_id:
                return
            try:
                port = int(props.get("port", "") or info.port or 0)
                generation = int(props.get("gen", "0") or 0)
            except ValueError:
                return
            if not 0 < port < 65536:
                return
            for address in info.parsed_addresses(IPVersion.V4Only):
                hint = PeerHint(
                    address=address,
                    port=port,
                    node_id=node_id,
                    mesh=props.get("mesh", ""),
                    generation=generation,
                    protocol=props.get("pv", ""),
                )
                log.debug("mDNS: saw %s", hint)
                try:
                    self._on_peer(hint)
                except Exception:
                    log.exception("mDNS peer callback failed")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.debug("mDNS: resolving %s failed", name, exc_info=True)

    async def _close_quietly(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            if self._browser is not None:
                await self._browser.async_cancel()
            if self._azc is not None:
                await self._azc.async_close()  # also sends goodbyes for the registration
        except Exception:
            log.debug("mDNS: close failed", exc_info=True)
        self._browser = None
        self._azc = None
        self.running = False

    async def close(self) -> None:
        await self._close_quietly()
