"""A schema fuzz of the OpenAI API with OpenAI's published spec (issue 12): schemathesis generates requests
for every OpenAI route the agent serves from the spec's own request schemas (`model` set to a real
catalogue id, or every request would stop at the model check), sends them to a real `helexa agent`
process, and checks each answer: never a 5xx, a 200 that conforms to the spec's response schema and
content type, anything else the OpenAI error envelope. Every other route of the spec is called once and
must answer 404 (or 405) in the envelope, never plain text.

The spec lies in `../shared/openai-openapi/` beside the checkout (as for `test_openapi_shapes`); without
it, or without schemathesis (`pip install -e .[test]` brings it), the fuzz is skipped. It runs
`FUZZ_EXAMPLES` requests per route, a few seconds in all (the `slow` set).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML ships no stubs
from hypothesis import HealthCheck, given, settings

from tests.helpers.agentproc import AgentProc, agent_argv, start_agent, stop_agent

from .test_openapi_shapes import EXTRACT_PATH, OPENAI_SPEC_PATH, validate

schemathesis = pytest.importorskip("schemathesis")

pytestmark = pytest.mark.slow

MODEL = "fake/chat"
EMBED_MODEL = "fake/embed"
CATALOGUE = f"""\
[[models]]
id = "{MODEL}"
engine = "fake"
memory_mb = 100
options = {{ memory_mb = 100 }}

[[models]]
id = "{EMBED_MODEL}"
engine = "fake"
task = "embed"
memory_mb = 100
options = {{ memory_mb = 100 }}
"""
# The OpenAI routes fuzzed (paths as the spec writes them, under its `/v1` server URL); every other route
# of the spec is held to the error envelope by the test below.
SERVED = {
    ("/chat/completions", "post"),
    ("/completions", "post"),
    ("/models", "get"),
    ("/models/{model}", "get"),
    ("/responses", "post"),
    ("/embeddings", "post"),
}
FUZZ_EXAMPLES = 100
CHECKS = ("not_a_server_error", "response_schema_conformance", "content_type_conformance")


def _spec() -> dict[str, Any]:
    if not OPENAI_SPEC_PATH.exists():
        pytest.skip(f"the published OpenAI spec is not at {OPENAI_SPEC_PATH}")
    with OPENAI_SPEC_PATH.open("rb") as f:
        spec: dict[str, Any] = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return spec


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return _spec()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProc]:
    """A real `helexa agent` serving one fake-engine model (sync: schemathesis calls with `requests`)."""
    tmp = tmp_path_factory.mktemp("fuzz")
    catalogue = tmp / "models.toml"
    catalogue.write_text(CATALOGUE, encoding="utf-8")
    state = tmp / "state"
    argv = agent_argv(
        name="fuzzed", port=0, host="127.0.0.1", state_dir=state, catalogue=catalogue, mdns=False
    )
    proc = start_agent(name="fuzzed", url="", state_dir=state, argv=argv)
    deadline = time.monotonic() + 30
    while "listening on http://" not in proc.log_text():
        assert proc.alive() and time.monotonic() < deadline, proc.log_tail()
        time.sleep(0.05)
    port = proc.log_text().split("listening on http://", 1)[1].split()[0].rsplit(":", 1)[1]
    proc.url = f"http://127.0.0.1:{port}"
    try:
        yield proc
        assert "Traceback" not in proc.log_text(), proc.log_tail(80)
    finally:
        stop_agent(proc)


def _served_operations(spec: dict[str, Any]) -> Any:
    only = dict(spec)
    only["paths"] = {
        path: {m: op for m, op in ops.items() if (path, m) in SERVED}
        for path, ops in spec["paths"].items()
        if any((path, m) in SERVED for m in ops)
    }
    return schemathesis.openapi.from_dict(only)


def _checks() -> list[Any]:
    return [getattr(schemathesis.checks, name) for name in CHECKS]


def _assert_envelope(status: int, text: str) -> None:
    body = json.loads(text)
    assert set(body) == {"error"}, text[:300]
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"], text[
        :300
    ]
    assert status in (400, 404, 413), text[:300]


def _fill(case: Any) -> None:
    """A real model id wherever the spec asks for one; a non-streamed answer (its schema is checked)."""
    if isinstance(case.body, dict):
        case.body["model"] = EMBED_MODEL if case.operation.path == "/embeddings" else MODEL
        if case.operation.path == "/responses":
            case.body.setdefault("input", "hi")  # optional in the spec (prompt templates), required here
        if case.operation.path == "/embeddings" and case.body.get("encoding_format") == "base64":
            # The spec types every embedding as an array, base64 answers too (OpenAI sends a string, as
            # the agent does; tests/agent/test_embeddings_api.py checks those with the SDK).
            case.body["encoding_format"] = "float"
        if case.body.get("stream") is True and case.operation.path == "/completions":
            case.body["stream"] = False  # the spec documents no event-stream answer for completions
    if case.path_parameters is not None and "model" in case.path_parameters:
        case.path_parameters["model"] = MODEL


STREAM_CHUNK = {"$ref": "#/components/schemas/CreateChatCompletionStreamResponse"}


def _check_stream(text: str, schemas: dict[str, Any]) -> None:
    """A streamed chat answer: `data:` events, each a chunk of the spec's stream schema, then `[DONE]`
    (schemathesis reads an event stream's events as `{"event", "data"}` objects, not as the JSON they
    carry, so the chunks are checked here)."""
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", text[-300:]
    for event in events[:-1]:
        assert validate(json.loads(event), STREAM_CHUNK, schemas) == [], event


def _check_response_events(text: str) -> None:
    """A streamed `/responses` answer: typed events numbered from 0, ending in completed or incomplete
    (the extracted schema subset does not hold the event schemas; tests/server/test_responses.py checks
    their shapes with the SDK)."""
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    assert [e["sequence_number"] for e in events] == list(range(len(events))), text[:300]
    assert events[0]["type"] == "response.created", text[:300]
    assert events[-1]["type"] in ("response.completed", "response.incomplete"), text[-300:]


@pytest.mark.parametrize("label", sorted(f"{m.upper()} {p}" for p, m in SERVED))
def test_served_routes_answer_every_request_the_spec_allows(
    label: str, spec: dict[str, Any], agent: AgentProc
) -> None:
    operation = _served_operations(spec)[label.split(" ", 1)[1]][label.split(" ", 1)[0]]
    base_url = f"{agent.url}/v1"
    stream_schemas = json.loads(EXTRACT_PATH.read_text())["schemas"]
    statuses: dict[int, int] = {}

    @given(case=operation.as_strategy())
    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def fuzz(case: Any) -> None:
        _fill(case)
        response = case.call(base_url=base_url, timeout=30)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        content_type = (response.headers.get("content-type") or [""])[0]
        if response.status_code == 200 and content_type.startswith("text/event-stream"):
            if case.operation.path == "/responses":
                _check_response_events(response.text)
            else:
                _check_stream(response.text, stream_schemas)
            return
        case.validate_response(response, checks=_checks())
        if response.status_code != 200:
            _assert_envelope(response.status_code, response.text)

    fuzz()
    # The fuzz reached the model: some requests were answered, not all refused.
    assert statuses.get(200, 0) > 0, statuses


async def test_every_other_route_of_the_spec_answers_in_the_envelope(
    spec: dict[str, Any], agent: AgentProc
) -> None:
    """Every other operation of the spec, called once: a 4xx in the OpenAI envelope (404 or 405 for the
    routes the agent does not serve), never plain text, never a 5xx."""
    calls = [
        (method.upper(), path.replace("{", "x-").replace("}", ""))
        for path, ops in spec["paths"].items()
        for method in ops
        if method in ("get", "post", "put", "patch", "delete") and (path, method) not in SERVED
    ]
    assert len(calls) > 100  # the spec's ~180 paths
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:

        async def call(method: str, path: str) -> tuple[str, int, str]:
            async with http.request(method, f"{agent.url}/v1{path}", json={"model": MODEL}) as r:
                return f"{method} {path}", r.status, await r.text()

        results = await asyncio.gather(*(call(m, p) for m, p in calls))
    for label, status, text in results:
        assert 400 <= status < 500, (label, status, text[:200])
        body = json.loads(text)
        assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"], (label, text)
    assert sum(status in (404, 405) for _, status, _ in results) > 100
