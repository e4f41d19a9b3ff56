"""A lab of N hosts on one LAN: network namespaces joined by a bridge (needs root and iproute2).

    with NetnsLab(3) as lab:              # 10.77.0.1 .. 10.77.0.3 on one bridge
        proc = lab.popen(0, [sys.executable, "-m", "helexa.mesh.cli", "agent"])
        lab.cut(1); ...; lab.heal(1)      # link down / up on node 1's bridge port
        lab.exec(2, ["ip", "addr"])

    with NetnsLab(3, host_link=True) as lab:   # this process joins the LAN too, like a laptop on it
        urllib.request.urlopen(f"http://{lab.address(0)}:31313/healthz")

Layout (names carry a random run id, so parallel runs and leftovers never collide):

    hx<id>-br  namespace holding bridge `br0` (multicast snooping off, so mDNS floods)
       └─ p<i> ──veth── eth0 in namespace hx<id>-n<i>, address 10.77.0.<i+1>/24, lo up,
                        route 224.0.0.0/4 via eth0 so multicast (mDNS) has a way out
       └─ ph ──veth── hx<id>h in the root namespace, address <subnet>.254/24   (only with host_link)

With `host_link=True` the calling process (root namespace) is a host on the LAN, so a test talks to
the agents with ordinary clients (the openai SDK, aiohttp) without entering a namespace. The root
namespace is shared with everything else on the machine, so such a lab picks a /24 that no interface or
route of the root namespace uses yet (`10.77.<k>` for a random k): parallel labs never collide.

`close()` (also on exceptions in `with`, and at interpreter exit) kills the processes it started and
deletes the namespaces, which deletes their veths and the bridge.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Sequence
from types import TracebackType
from typing import Any

SUBNET = "10.77.0"
HOST_OCTET = 254

# ICMP echo with a raw socket: the images we test in have no `ping` binary.
_PING = r"""
import os, socket, struct, sys, time
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xFFFF); s += s >> 16
    return ~s & 0xFFFF
dst, timeout = sys.argv[1], float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); s.settimeout(timeout)
ident = os.getpid() & 0xFFFF
pkt = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"helexa"
pkt = struct.pack("!BBHHH", 8, 0, csum(pkt), ident, 1) + b"helexa"
s.sendto(pkt, (dst, 0)); end = time.monotonic() + timeout
while True:
    try:
        data, addr = s.recvfrom(1024)
    except (socket.timeout, OSError):
        sys.exit(1)
    t, _, _, i, _ = struct.unpack("!BBHHH", data[20:28])
    if addr[0] == dst and t == 0 and i == ident: sys.exit(0)
    if time.monotonic() > end: sys.exit(1)
"""


def available() -> str | None:
    """None if the lab can run here, else why not (for a clear skip/failure message)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed (scripts/setup installs it)"
    return None


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=30)


def _free_subnet() -> str:
    """A `10.77.<k>` /24 that nothing in the root namespace uses (for a host link)."""
    used = _run("ip", "-4", "addr").stdout + _run("ip", "-4", "route").stdout
    for _ in range(100):
        subnet = f"10.77.{secrets.randbelow(254) + 1}"
        if f"{subnet}." not in used:
            return subnet
    raise RuntimeError("no free 10.77.<k>.0/24 subnet in the root namespace")


class NetnsLab:
    def __init__(self, n: int, *, subnet: str | None = None, host_link: bool = False) -> None:
        if not 1 <= n <= 200:
            raise ValueError("1..200 nodes")
        self.n = n
        self.host_link = host_link
        self._subnet = subnet
        self.subnet = subnet or SUBNET
        self.run_id = secrets.token_hex(3)
        self.bridge_ns = f"hx{self.run_id}-br"
        self.node_ns = [f"hx{self.run_id}-n{i}" for i in range(n)]
        self.host_if = f"hx{self.run_id}h"
        self._procs: list[subprocess.Popen[Any]] = []
        self._created: list[str] = []

    def address(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}"

    @property
    def host_address(self) -> str:
        """The root namespace's address on the LAN (only with `host_link`)."""
        if not self.host_link:
            raise RuntimeError("this lab has no host link")
        return f"{self.subnet}.{HOST_OCTET}"

    def _port(self, i: int) -> str:
        return f"p{i}"

    # --- lifecycle ------------------------------------------------------------------------------------

    def __enter__(self) -> NetnsLab:
        atexit.register(self.close)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _add_ns(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self._created.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        if self.host_link and self._subnet is None:
            self.subnet = _free_subnet()
        self._add_ns(self.bridge_ns)
        b = self.bridge_ns
        _run("ip", "-n", b, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _run("ip", "-n", b, "link", "set", "br0", "up")
        for i, ns in enumerate(self.node_ns):
            self._add_ns(ns)
            port = self._port(i)
            # Create the pair inside the bridge namespace (no root-namespace names to collide), then move
            # one end into the node's namespace as eth0.
            _run("ip", "-n", b, "link", "add", port, "type", "veth", "peer", "name", f"e{i}")
            _run("ip", "-n", b, "link", "set", f"e{i}", "netns", ns)
            _run("ip", "-n", ns, "link", "set", f"e{i}", "name", "eth0")
            _run("ip", "-n", b, "link", "set", port, "master", "br0")
            _run("ip", "-n", b, "link", "set", port, "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up", "multicast", "on")
            _run("ip", "-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")
        if self.host_link:
            # Created in the bridge namespace, the other end moved into this process's namespace: deleting the
            # bridge namespace deletes the pair, so `close()` needs no extra step.
            _run("ip", "-n", b, "link", "add", "ph", "type", "veth", "peer", "name", self.host_if)
            _run("ip", "-n", b, "link", "set", self.host_if, "netns", str(os.getpid()))
            _run("ip", "-n", b, "link", "set", "ph", "master", "br0")
            _run("ip", "-n", b, "link", "set", "ph", "up")
            _run("ip", "addr", "add", f"{self.host_address}/24", "dev", self.host_if)
            _run("ip", "link", "set", self.host_if, "up")

    def close(self) -> None:
        """Kill started processes, delete every namespace of this run. Safe to call twice."""
        for p in self._procs:
            if p.poll() is None:
                p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=5)
            for pipe in (p.stdin, p.stdout, p.stderr):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
        self._procs.clear()
        for ns in reversed(self._created):
            _run("ip", "netns", "del", ns, check=False)
        if self._created and self.host_link:
            # Normally gone with the bridge namespace; make sure (a veth can outlive a busy namespace).
            _run("ip", "link", "del", self.host_if, check=False)
        self._created.clear()
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)

    # --- running things -------------------------------------------------------------------------------

    def _wrap(self, i: int, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.node_ns[i], *argv]

    def popen(self, i: int, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process inside node i's namespace; killed at `close()`."""
        p = subprocess.Popen(self._wrap(i, argv), **kwargs)
        self._procs.append(p)
        return p

    def exec(self, i: int, argv: Sequence[str], *, timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self._wrap(i, argv), capture_output=True, text=True, timeout=timeout_s, check=False
        )

    def python(
        self, i: int, code: str, *args: str, timeout_s: float = 30
    ) -> subprocess.CompletedProcess[str]:
        return self.exec(i, [sys.executable, "-c", code, *args], timeout_s=timeout_s)

    def ping(self, src: int, dst: int, *, timeout_s: float = 2.0) -> bool:
        """One ICMP echo from node src to node dst."""
        return (
            self.python(src, _PING, self.address(dst), str(timeout_s), timeout_s=timeout_s + 10).returncode
            == 0
        )

    # --- faults ---------------------------------------------------------------------------------------

    def cut(self, i: int) -> None:
        """Take node i off the LAN (its bridge port down); its own interface and address stay."""
        _run("ip", "-n", self.bridge_ns, "link", "set", self._port(i), "down")

    def heal(self, i: int) -> None:
        _run("ip", "-n", self.bridge_ns, "link", "set", self._port(i), "up")
