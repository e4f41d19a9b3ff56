"""The agent's logs (issue 5): one info line per request on both agents of a forwarded request, warnings
for evictions and peer state changes (a flapping peer once, then at debug), journald-friendly output
(no colour codes off a terminal, syslog priority prefixes under journald), level from flag or env."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from helexa.mesh.config import load_config
from helexa.mesh.fleet.membership import MembershipEvent
from helexa.mesh.fleet.records import Liveness, NodeId
from helexa.mesh.logs import configure_logging
from helexa.mesh.peering import PeerStateLog
from tests.helpers.agentproc import agent_command, agent_env
from tests.helpers.agents import entry
from tests.helpers.polling import eventually
from tests.helpers.ports import free_port

from .conftest import Mesh

ANSI = re.compile(rb"\x1b\[")


def _messages(caplog: pytest.LogCaptureFixture, logger: str, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == level]


@pytest.mark.slow
async def test_request_lines_eviction_and_peer_warnings_on_real_agents(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    words: dict[str, object] = {"tokens": ["one", " two", " three"]}
    entries = [entry("org/one", memory_mb=600, options=words), entry("org/two", memory_mb=600, options=words)]
    b = await mesh.start("b", entries=entries, memory_mb=1000)
    c = await mesh.start("c", entries=entries, memory_mb=100, peers=[b])
    a = await mesh.start("a", entries=entries, memory_mb=100, peers=[b, c])
    await eventually(lambda: a.sees(b) and a.sees(c) and b.sees(a), what="membership")
    hi: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
    client = openai.AsyncOpenAI(base_url=f"{a.url}/v1", api_key="none", max_retries=0)
    async with client:
        await client.chat.completions.create(model="org/one", messages=hi)
        stream = await client.chat.completions.create(model="org/one", messages=hi, stream=True)
        assert "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])

    lines = _messages(caplog, "helexa.mesh.server.inference", logging.INFO)
    entry_lines = [m for m in lines if "route=forwarded" in m]
    serving_lines = [m for m in lines if "source=peer" in m]
    assert len(entry_lines) == 2 and len(serving_lines) == 2, lines
    for m in entry_lines:  # the entry agent: where it went, what it answered, how long it took
        assert re.fullmatch(
            r"chat model=org/one route=forwarded node=b source=client status=200 prompt_tokens=-"
            r" completion_tokens=- ttft_ms=- duration_ms=\d+\.\d",
            m,
        ), m
    for m in serving_lines:  # the serving agent: tokens and time to first token too
        assert re.fullmatch(
            r"chat model=org/one route=local node=b source=peer status=200 prompt_tokens=\d+"
            r" completion_tokens=3 ttft_ms=\d+\.\d duration_ms=\d+\.\d",
            m,
        ), m

    # An eviction is a warning naming what was evicted and for what.
    async with mesh.http.post(
        f"{b.url}/v1/chat/completions", json={"model": "org/two", "messages": hi}
    ) as resp:
        assert resp.status == 200
    (evicted,) = [
        m for m in _messages(caplog, "helexa.mesh.routing.neuron", logging.WARNING) if "evicting" in m
    ]
    assert "org/one" in evicted and "org/two" in evicted

    # Peer state changes are warnings: c dies (suspect, then dead), b leaves.
    await c.running.kill()
    await eventually(
        lambda: a.agent.mesh.gossip.liveness(c.agent.identity.node_id) == "dead", what="a to see c dead"
    )
    await b.running.stop()
    await eventually(
        lambda: a.agent.mesh.gossip.liveness(b.agent.identity.node_id) == "left", what="a to see b leave"
    )
    warnings = _messages(caplog, "helexa.mesh.peering", logging.WARNING)
    assert any(m.startswith("peer c (") and "is suspect" in m for m in warnings), warnings
    assert any(m.startswith("peer c (") and "is dead" in m for m in warnings), warnings
    assert any(m.startswith("peer b (") and "left the mesh" in m for m in warnings), warnings
    joins = _messages(caplog, "helexa.mesh.peering", logging.INFO)
    assert any(m.startswith("peer b (") and "joined" in m for m in joins), joins


def _event(previous: Liveness | None, current: Liveness, *, restarted: bool = False) -> MembershipEvent:
    return MembershipEvent(
        node_id=NodeId("f" * 32),
        name="flappy",
        previous=previous,
        current=current,
        generation=2 if restarted else 1,
        restarted=restarted,
    )


def test_a_flapping_peer_is_warned_about_once_then_logged_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="helexa.mesh.peering")
    now = [1000.0]
    peers = PeerStateLog(quiet_s=300.0, clock=lambda: now[0])
    sequence: list[tuple[Liveness | None, Liveness]] = [
        (None, "alive"),  # joined: info
        ("alive", "suspect"),  # warning
        ("suspect", "alive"),  # warning (alive again)
        ("alive", "suspect"),  # flapping: debug
        ("suspect", "alive"),  # debug
        ("alive", "suspect"),  # debug
        ("suspect", "dead"),  # a different change: warning
    ]
    for previous, current in sequence:
        now[0] += 2.0
        peers.log(_event(previous, current))
    levels = [r.levelno for r in caplog.records if r.name == "helexa.mesh.peering"]
    assert levels == [
        logging.INFO,
        logging.WARNING,
        logging.WARNING,
        logging.DEBUG,
        logging.DEBUG,
        logging.DEBUG,
        logging.WARNING,
    ]
    assert "flappy" in caplog.records[1].getMessage() and "suspect" in caplog.records[1].getMessage()
    # Quiet for the window: the next change is a warning again; so is a restart.
    caplog.clear()
    now[0] += 301.0
    peers.log(_event("dead", "alive"))
    peers.log(_event("alive", "alive", restarted=True))
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.WARNING]
    assert "restarted" in caplog.records[1].getMessage()


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging replaces the root handlers (pytest's included): put them back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    aiohttp_level = logging.getLogger("aiohttp").level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    logging.getLogger("aiohttp").setLevel(aiohttp_level)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_level_from_flag_or_env_and_colour_only_on_a_terminal(tmp_path: Path, restore_logging: None) -> None:
    log = logging.getLogger("mesh.test_logs")
    home = {"HOME": str(tmp_path)}
    for argv, env, level in (
        (["--log-level", "warning"], home, logging.WARNING),
        ([], {**home, "HELEXA_LOG_LEVEL": "debug"}, logging.DEBUG),
        (["--log-level", "error"], {**home, "HELEXA_LOG_LEVEL": "debug"}, logging.ERROR),  # flag wins
        ([], home, logging.INFO),
    ):
        config = load_config(argv, env)
        out = io.StringIO()
        configure_logging(config.log_level, stream=out, environ={})
        assert logging.getLogger().level == level
        log.info("an info line")
        log.warning("a warning line")
        text = out.getvalue()
        assert ("an info line" in text) == (level <= logging.INFO)
        assert ("a warning line" in text) == (level <= logging.WARNING)
        assert "\x1b[" not in text  # not a terminal: no colour

    tty = _Tty()
    configure_logging("info", stream=tty, environ={})
    log.warning("coloured")
    assert "\x1b[33m" in tty.getvalue()
    tty = _Tty()
    configure_logging("info", stream=tty, environ={"NO_COLOR": "1"})
    log.warning("plain")
    assert "\x1b[" not in tty.getvalue()


def test_journald_gets_priority_prefixes_and_no_timestamps(tmp_path: Path, restore_logging: None) -> None:
    log = logging.getLogger("mesh.test_logs")
    with (tmp_path / "journal").open("w+") as stream:
        st = os.fstat(stream.fileno())
        configure_logging("info", stream=stream, environ={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        log.info("hello journal")
        log.warning("careful")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("it broke")
        stream.flush()
        stream.seek(0)
        lines = stream.read().splitlines()
    assert lines[0] == "<6>INFO mesh.test_logs: hello journal"
    assert lines[1] == "<4>WARNING mesh.test_logs: careful"
    assert lines[2] == "<3>ERROR mesh.test_logs: it broke"
    # The traceback stays inside that one entry (continuation lines are indented, never prefixed).
    assert all(line.startswith("    ") for line in lines[3:]) and "ValueError: boom" in lines[-1]
    # Another stream under the same environment is not the journal.
    other = io.StringIO()
    configure_logging("info", stream=other, environ={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    log.info("to a file")
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO mesh.test_logs: to a file", other.getvalue())


async def _run_agent(tmp_path: Path, *args: str, env: dict[str, str]) -> bytes:
    """Run `helexa agent` as a process (stderr a pipe, as under systemd or a log shipper), send it a
    request, stop it with SIGTERM; returns its stderr."""
    port = free_port()
    environ = agent_env(
        tmp_path,
        {"HELEXA_STATE_DIR": str(tmp_path / "state"), "TERM": "xterm-256color", **env},
        no_color=False,
    )
    proc = await asyncio.create_subprocess_exec(
        *agent_command(),
        "agent",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-mdns",
        "--name",
        "logs",
        *args,
        env=environ,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with aiohttp.ClientSession() as http:

            async def up() -> bool:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                        return r.status == 200
                except aiohttp.ClientError:
                    return proc.returncode is not None  # exited: stop waiting, the asserts say why

            await eventually(up, timeout_s=30, what="the agent to answer /healthz")
            async with http.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json={"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]},
            ) as r:
                assert r.status == 404
        proc.send_signal(signal.SIGTERM)
        assert proc.stderr is not None
        async with asyncio.timeout(20):
            err = await proc.stderr.read()
            assert await proc.wait() == 0, err.decode()
        return err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_process_logs_plain_lines_at_the_level_asked(tmp_path: Path) -> None:
    err = await _run_agent(tmp_path / "debug", env={"HELEXA_LOG_LEVEL": "debug"})
    assert not ANSI.search(err), err[:2000]
    text = err.decode()
    assert " DEBUG " in text and " INFO " in text  # the env's level took effect
    assert re.search(
        r" INFO helexa\.mesh\.server\.inference: chat model=- route=local node=- source=client status=404 ",
        text,
    ), text
    for line in text.splitlines():
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) \S+: ", line) or (
            line.startswith((" ", "\t", "Traceback"))
        ), line

    err = await _run_agent(tmp_path / "warning", "--log-level", "warning", env={})
    assert not ANSI.search(err)
    assert " INFO " not in err.decode() and " DEBUG " not in err.decode()
