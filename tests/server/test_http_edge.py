"""The edge at the HTTP level (raw aiohttp client): SSE framing and keep-alives, disconnects, error
envelopes for aiohttp's own errors and garbage, forwarding, health and metrics."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from helexa.mesh import timing
from helexa.mesh.fleet.records import NodeId, NodeRecord
from helexa.mesh.metrics import Metrics
from helexa.mesh.routing.decisions import RemoteDecision
from helexa.mesh.routing.peer_client import FORWARDED_HEADER
from helexa.mesh.server import appkeys
from tests.helpers.polling import eventually

from .conftest import DEFAULT_TOKENS, TEST_KEEPALIVE_S, TEST_MAX_BODY_BYTES, Edge

MODEL = "test/tiny-chat"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


async def read_events(response: aiohttp.ClientResponse) -> list[bytes]:
    """Every SSE line (comments included) of a finished stream, blank separators dropped."""
    body = await response.read()
    return [line for line in body.split(b"\n") if line]


def assert_envelope(body: bytes, *, param: str | None = None) -> dict[str, object]:
    data = orjson.loads(body)
    assert set(data) == {"error"}
    error = data["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param
    return error


async def test_keepalive_comments_while_acquire_is_slow(session: aiohttp.ClientSession, edge: Edge) -> None:
    slot = edge.cortex.add("cold/model")
    slot.gate = asyncio.Event()
    async with session.post(
        f"{edge.base_url}/chat/completions", json={**CHAT, "model": "cold/model", "stream": True}
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        seen = [await resp.content.readline() for _ in range(4)]
        assert seen == [b": keep-alive\n", b"\n", b": keep-alive\n", b"\n"]
        slot.gate.set()
        lines = await read_events(resp)
    assert lines[-1] == b"data: [DONE]"
    data = [orjson.loads(line[6:]) for line in lines if line.startswith(b"data: {")]
    assert "".join(d["choices"][0]["delta"].get("content", "") for d in data) == "".join(DEFAULT_TOKENS)
    assert slot.in_flight == 0 and slot.released == 1 and slot.loads == 1
    exposition = edge.metrics.render().decode()
    assert 'helexa_time_to_first_token_seconds_count{cold="true",model="cold/model"} 1.0' in exposition


async def test_fast_stream_sends_no_keepalive(session: aiohttp.ClientSession, edge: Edge) -> None:
    async with session.post(f"{edge.base_url}/chat/completions", json={**CHAT, "stream": True}) as resp:
        lines = await read_events(resp)
    assert not [line for line in lines if line.startswith(b":")]
    assert lines[-1] == b"data: [DONE]"


async def test_load_failure_after_stream_started_is_an_error_event(
    session: aiohttp.ClientSession, edge: Edge
) -> None:
    slot = edge.cortex.add(
        "broken/model", options={"fail_load": "config.json missing in /srv/x on host-a.lan"}
    )
    slot.gate = asyncio.Event()
    async with session.post(
        f"{edge.base_url}/chat/completions", json={**CHAT, "model": "broken/model", "stream": True}
    ) as resp:
        assert await resp.content.readline() == b": keep-alive\n"
        slot.gate.set()
        lines = await read_events(resp)
    assert b"data: [DONE]" not in lines
    error = assert_envelope(lines[-1].removeprefix(b"data: "))
    assert error["code"] == "model_load_failed"
    assert "/srv" not in str(error["message"]) and "host-a" not in str(error["message"])
    assert slot.in_flight == 0 and slot.model is None


async def test_mid_stream_failure_is_a_final_error_event(session: aiohttp.ClientSession, edge: Edge) -> None:
    edge.cortex.add("faulty/model", options={"fail_after_tokens": 3})
    async with session.post(
        f"{edge.base_url}/completions", json={"model": "faulty/model", "prompt": "p", "stream": True}
    ) as resp:
        assert resp.status == 200
        lines = await read_events(resp)
    assert b"data: [DONE]" not in lines
    texts = [orjson.loads(line[6:])["choices"][0]["text"] for line in lines[:-1]]
    assert "".join(texts) == "".join(DEFAULT_TOKENS[:3])
    error = assert_envelope(lines[-1].removeprefix(b"data: "))
    assert error["code"] == "model_failed" and error["type"] == "server_error"
    assert 'status="500"' in edge.metrics.render().decode()


async def test_client_disconnect_closes_the_generator(session: aiohttp.ClientSession, edge: Edge) -> None:
    slot = edge.cortex.add(
        "slow/model", options={"tokens": [f" t{i}" for i in range(1000)], "token_delay_s": 0.01}
    )
    resp = await session.post(
        f"{edge.base_url}/chat/completions", json={**CHAT, "model": "slow/model", "stream": True}
    )
    assert resp.status == 200
    first = await resp.content.readline()
    assert first.startswith(b"data: {")
    resp.close()  # drop the connection mid-stream
    await eventually(lambda: slot.fake.requests_cancelled == 1, timeout_s=5.0, interval_s=0.01)
    assert slot.fake.requests_finished == 0 and slot.fake.in_flight == 0
    await eventually(lambda: slot.in_flight == 0 and slot.released == 1, timeout_s=5.0, interval_s=0.01)
    await eventually(lambda: 'status="499"' in edge.metrics.render().decode(), timeout_s=5.0, interval_s=0.01)


async def test_client_disconnect_while_waiting_for_load_releases(
    session: aiohttp.ClientSession, edge: Edge
) -> None:
    slot = edge.cortex.slots[MODEL]
    slot.gate = asyncio.Event()
    released_before = slot.released  # the fixture's preload
    resp = await session.post(f"{edge.base_url}/chat/completions", json={**CHAT, "stream": True})
    assert await resp.content.readline() == b": keep-alive\n"
    resp.close()
    await eventually(
        lambda: slot.in_flight == 0 and slot.released == released_before + 1, timeout_s=5.0, interval_s=0.01
    )
    assert slot.model is not None and slot.model.requests == []


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"", None),
        (b"{not json", None),
        (b"\xff\xfe\x00garbage", None),
        (b"[1, 2, 3]", None),
        (b'"just a string"', None),
        (b"{}", "model"),
        (b'{"model": 5, "messages": []}', "model"),
        (b'{"model": "m"}', "messages"),
        (b'{"model": "m", "messages": "hi"}', "messages"),
        (b'{"model": "m", "messages": []}', "messages"),
        (b'{"model": "m", "messages": [5]}', "messages[0]"),
        (b'{"model": "m", "messages": [{"content": "x"}]}', "messages[0].role"),
        (b'{"model": "m", "messages": [{"role": "wizard", "content": "x"}]}', "messages[0].role"),
        (b'{"model": "m", "messages": [{"role": "user", "content": 7}]}', "messages[0].content"),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text"}]}]}',
            "messages[0].content[0].text",
        ),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["a", 3]}', "stop[1]"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "stream"),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream_options": 1}',
            "stream_options",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": true}',
            "temperature",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "metadata": {"a": 1}}',
            "metadata.a",
        ),
    ],
)
async def test_bad_chat_bodies_are_400_envelopes(
    session: aiohttp.ClientSession, edge: Edge, body: bytes, param: str | None
) -> None:
    async with session.post(f"{edge.base_url}/chat/completions", data=body) as resp:
        assert resp.status == 400
        error = assert_envelope(await resp.read(), param=param)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"model": "m"}', "prompt"),
        (b'{"model": "m", "prompt": 3}', "prompt"),
        (b'{"model": "m", "prompt": [1, -2, 3]}', "prompt[1]"),
        (b'{"model": "m", "prompt": [[1], "b"]}', "prompt[1]"),
        (b'{"model": "m", "prompt": []}', "prompt"),
        (b'{"model": "m", "prompt": "x", "echo": true, "logprobs": 1, "stream": true}', "echo"),
        (b'{"model": "m", "prompt": "x", "best_of": 3}', "best_of"),
        (b'{"model": "m", "prompt": "x", "logprobs": 21}', "logprobs"),
        (b'{"model": "m", "prompt": ["a", "b"], "n": 65}', "n"),
        (b'{"model": "m", "prompt": "x", "suffix": "y", "echo": true}', "suffix"),
        (b'{"model": "m", "prompt": "x", "suffix": 3}', "suffix"),
    ],
)
async def test_bad_completion_bodies_are_400_envelopes(
    session: aiohttp.ClientSession, edge: Edge, body: bytes, param: str
) -> None:
    async with session.post(f"{edge.base_url}/completions", data=body) as resp:
        assert resp.status == 400
        assert_envelope(await resp.read(), param=param)


async def test_aiohttp_errors_are_envelopes(session: aiohttp.ClientSession, edge: Edge) -> None:
    async with session.get(f"{edge.base_url}/nothing/here") as resp:
        assert resp.status == 404
        assert assert_envelope(await resp.read())["code"] == "not_found"
    async with session.get(f"{edge.base_url}/chat/completions") as resp:
        assert resp.status == 405
        assert "POST" in resp.headers["Allow"]
        assert assert_envelope(await resp.read())["code"] == "method_not_allowed"
    async with session.post(f"{edge.base_url}/models") as resp:
        assert resp.status == 405
        assert_envelope(await resp.read())
    huge = b'{"model": "m", "prompt": "' + b"x" * (TEST_MAX_BODY_BYTES * 2) + b'"}'
    async with session.post(f"{edge.base_url}/completions", data=huge) as resp:
        assert resp.status == 413
        assert assert_envelope(await resp.read())["code"] == "payload_too_large"


async def test_unexpected_errors_are_logged_500_envelopes(
    session: aiohttp.ClientSession, edge: Edge, caplog: pytest.LogCaptureFixture
) -> None:
    edge.cortex.route_error = RuntimeError("db at internal-host-7.lan:5432 exploded")
    async with session.post(f"{edge.base_url}/chat/completions", json=CHAT) as resp:
        assert resp.status == 500
        error = assert_envelope(await resp.read())
    assert error["code"] == "internal_error"
    assert "internal-host" not in str(error)
    assert any("internal-host-7" in (r.exc_text or r.getMessage()) for r in caplog.records)
    edge.cortex.route_error = None
    async with session.post(f"{edge.base_url}/chat/completions", json=CHAT) as resp:
        assert resp.status == 200  # the agent is still fine


async def test_remote_decision_without_forwarder_is_503(session: aiohttp.ClientSession, edge: Edge) -> None:
    edge.cortex.add("remote/model", remote=_peer())
    async with session.post(
        f"{edge.base_url}/chat/completions", json={**CHAT, "model": "remote/model"}
    ) as resp:
        assert resp.status == 503
        assert "Retry-After" in resp.headers
        error = assert_envelope(await resp.read())
    assert "10.9.9.9" not in str(error) and "peer-host" not in str(error)


def _peer() -> NodeRecord:
    return NodeRecord(
        node_id=NodeId("peer-1"),
        name="peer-host",
        generation=1,
        version=1,
        heartbeat=1,
        address="10.9.9.9",
        port=1,
    )


async def test_remote_decision_calls_the_forwarder_with_raw_body(
    session: aiohttp.ClientSession, make_edge
) -> None:
    calls: list[tuple[str, bytes]] = []

    async def forwarder(request: web.Request, decision: RemoteDecision, body: bytes) -> web.StreamResponse:
        calls.append((decision.node.name, body))
        return web.Response(body=b'{"forwarded": true}', content_type="application/json")

    edge = await make_edge(lambda app: app.__setitem__(appkeys.FORWARDER, forwarder))
    edge.cortex.add("remote/model", remote=_peer())
    raw = b'{"model": "remote/model",   "messages": [{"role": "user", "content": "x"}]}'
    async with session.post(f"{edge.base_url}/chat/completions", data=raw) as resp:
        assert await resp.json() == {"forwarded": True}
    # A forwarded request is served here, never routed again.
    async with session.post(
        f"{edge.base_url}/chat/completions", data=raw, headers={FORWARDED_HEADER: "peer-0"}
    ) as resp:
        assert (await resp.json())["object"] == "chat.completion"
    assert calls == [("peer-host", raw)]
    assert edge.cortex.routed[-2:] == [("remote/model", False), ("remote/model", True)]
    assert 'route="forwarded"' in edge.metrics.render().decode()


async def test_healthz(session: aiohttp.ClientSession, make_edge) -> None:
    state = {"status": "ok", "models": 1}
    edge = await make_edge(lambda app: app.__setitem__(appkeys.HEALTH, lambda: state))
    async with session.get(f"{edge.server_url}/healthz") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok", "models": 1, "node": "test-node"}
    state["status"] = "draining"
    async with session.get(f"{edge.server_url}/healthz") as resp:
        assert resp.status == 503
        assert (await resp.json())["status"] == "draining"


ALL_FAMILIES = {
    "helexa_requests": "counter",
    "helexa_request_duration_seconds": "histogram",
    "helexa_time_to_first_token_seconds": "histogram",
    "helexa_inter_token_latency_seconds": "histogram",
    "helexa_tokens": "counter",
    "helexa_model_loads": "counter",
    "helexa_model_load_duration_seconds": "histogram",
    "helexa_model_unloads": "counter",
    "helexa_evictions": "counter",
    "helexa_in_flight_requests": "gauge",
    "helexa_queued_requests": "gauge",
    "helexa_peers": "gauge",
    "helexa_gossip_rounds": "counter",
    "helexa_gossip_bytes": "counter",
    "helexa_device_memory_used_bytes": "gauge",
    "helexa_device_memory_total_bytes": "gauge",
    "helexa_device_utilization_ratio": "gauge",
}


async def test_metrics_after_traffic(session: aiohttp.ClientSession, edge: Edge) -> None:
    m = edge.metrics
    m.model_loaded(model=MODEL, result="ok", duration_s=1.5)
    m.model_unloaded(model=MODEL)
    m.evicted(reason="memory")
    m.set_model_load(model=MODEL, in_flight=1, queued=2)
    m.set_peers({"alive": 2, "dead": 1})
    m.gossip_round(bytes_total=1234)
    m.set_device(device="cpu", used_bytes=10, total_bytes=100, utilization_ratio=0.5)
    for stream in (False, True):
        async with session.post(f"{edge.base_url}/chat/completions", json={**CHAT, "stream": stream}) as resp:
            await resp.read()
    async with session.post(f"{edge.base_url}/chat/completions", json={**CHAT, "model": "x/y"}) as resp:
        assert resp.status == 404
    async with session.get(f"{edge.server_url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in ALL_FAMILIES.items():
        assert name in families, name
        assert families[name].type == kind, name
        assert families[name].samples, name
    requests = {
        (s.labels["model"], s.labels["status"], s.labels["route"], s.labels["node"]): s.value
        for s in families["helexa_requests"].samples
        if s.name == "helexa_requests_total"
    }
    assert requests[(MODEL, "200", "local", "test-node")] == 2
    assert requests[("-", "404", "local", "test-node")] == 1
    tokens = {
        s.labels["kind"]: s.value
        for s in families["helexa_tokens"].samples
        if s.name == "helexa_tokens_total"
    }
    assert tokens == {"prompt": 2, "completion": 2 * len(DEFAULT_TOKENS)}  # the fake counts words: "hi"
    inter = [s for s in families["helexa_inter_token_latency_seconds"].samples if s.name.endswith("_count")]
    assert inter[0].value == 2 * (len(DEFAULT_TOKENS) - 1)
    peers = {s.labels["state"]: s.value for s in families["helexa_peers"].samples}
    assert peers == {"alive": 2, "suspect": 0, "dead": 1}


async def test_two_metrics_objects_coexist() -> None:
    a, b = Metrics(node="a"), Metrics(node="b")
    a.evicted(reason="idle")
    assert b"helexa_evictions_total" in a.render()
    assert b'helexa_evictions_total{reason="idle"}' not in b.render()


async def test_keepalive_interval_constant_is_one_second() -> None:
    assert timing.SSE_KEEPALIVE_INTERVAL_S == 1.0
    assert TEST_KEEPALIVE_S < timing.SSE_KEEPALIVE_INTERVAL_S
