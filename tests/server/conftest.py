"""Fixtures for the HTTP edge: a real aiohttp server on port 0 with the OpenAI routes, the error
middleware and a test cortex over `engine.fake.FakeEngine` models, plus the official openai SDK.

The test cortex is the smallest thing that honours the `Cortex` contract: it resolves ids and aliases,
cold-loads through the fake engine on the first `acquire()`, can be told to be slow (a gate), to fail
the load, to refuse (`ModelUnavailable`) or to route to a peer, and counts reservations so tests can
check they are always released.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import aiohttp
import openai
import pytest
from aiohttp import web

from helexa.catalogue.entry import ModelEntry
from helexa.engine.base import (
    GenerationEvent,
    GenerationRequest,
    LoadedModel,
    LoadSpec,
    MemoryReport,
    ModelId,
    RequestId,
)
from helexa.engine.fake import FakeEngine, FakeModel, FakeScript
from helexa.mesh.errors import ModelNotFound, ModelUnavailable
from helexa.mesh.fleet.records import NodeId, NodeRecord
from helexa.mesh.metrics import Metrics
from helexa.mesh.routing.decisions import Location, ModelListing, RemoteDecision
from helexa.mesh.server import appkeys
from helexa.mesh.server.headers import CorsPolicy, add_response_headers
from helexa.mesh.server.middleware import error_middleware
from helexa.mesh.server.openai_routes import add_openai_routes

# Keep-alive interval for tests: short, so a "slow" acquire of a few ticks costs well under a second.
TEST_KEEPALIVE_S = 0.05
# Small request-body limit so the 413 test does not need megabytes.
TEST_MAX_BODY_BYTES = 64 * 1024
DEFAULT_TOKENS = ("Hello", ",", " world", "!", " How", " are", " you", "?")


class RecordingModel:
    """A `LoadedModel` that remembers every request it was given (to check what the edge passed on)."""

    def __init__(self, inner: FakeModel) -> None:
        self.inner = inner
        self.requests: list[GenerationRequest] = []

    @property
    def model_id(self) -> ModelId:
        return self.inner.model_id

    @property
    def memory(self) -> MemoryReport:
        return self.inner.memory

    @property
    def context_length(self) -> int:
        return self.inner.context_length

    @property
    def waiting(self) -> int:
        return self.inner.waiting

    def count_tokens(self, request: GenerationRequest) -> int:
        return self.inner.count_tokens(request)

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        self.requests.append(request)
        return self.inner.generate(request)

    async def abort(self, request_id: RequestId) -> None:
        await self.inner.abort(request_id)

    async def unload(self) -> None:
        await self.inner.unload()


@dataclass(kw_only=True)
class ModelSlot:
    """One catalogue model of the test cortex and how acquiring it behaves."""

    entry: ModelEntry
    model: RecordingModel | None = None  # set once loaded
    gate: asyncio.Event | None = None  # acquire() waits for it (a slow cold load)
    unavailable: ModelUnavailable | None = None  # route() raises it
    remote: NodeRecord | None = None  # route() returns a RemoteDecision to this node
    in_flight: int = 0
    released: int = 0
    loads: int = 0

    @property
    def loaded(self) -> RecordingModel:
        assert self.model is not None, "model not loaded yet"
        return self.model

    @property
    def fake(self) -> FakeModel:
        assert self.model is not None, "model not loaded yet"
        return self.model.inner


@dataclass(frozen=True, kw_only=True)
class TestDecision:
    entry: ModelEntry
    slot: ModelSlot
    engine: FakeEngine
    cold: bool

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[LoadedModel]:
        slot = self.slot
        slot.in_flight += 1
        try:
            if slot.gate is not None:
                await slot.gate.wait()
            if slot.model is None:
                spec = LoadSpec(
                    model_id=self.entry.id,
                    source=self.entry.source,
                    context_length=self.entry.context_length,
                    options=self.entry.options,
                )
                slot.model = RecordingModel(await self.engine.load(spec))
                slot.loads += 1
            yield slot.model
        finally:
            slot.in_flight -= 1
            slot.released += 1


class TestCortex:
    """A `Cortex` over `ModelSlot`s; resolves ids and aliases like the real one."""

    __test__ = False

    def __init__(self) -> None:
        self.engine = FakeEngine(FakeScript(tokens=DEFAULT_TOKENS))
        self.slots: dict[str, ModelSlot] = {}
        self.routed: list[tuple[str, bool]] = []
        self.route_error: Exception | None = None

    def add(
        self,
        model_id: str,
        *,
        aliases: Sequence[str] = (),
        defaults: dict[str, float | int] | None = None,
        context_length: int | None = None,
        options: dict[str, object] | None = None,
        remote: NodeRecord | None = None,
    ) -> ModelSlot:
        """Add a catalogue model; `options` is the fake engine's script (`engine.fake.FakeScript` fields)."""
        entry = ModelEntry(
            id=ModelId(model_id),
            source="/models/x",
            engine="fake",
            aliases=tuple(aliases),
            defaults=defaults or {},
            context_length=context_length,
            options=options or {},
        )
        slot = ModelSlot(entry=entry, remote=remote)
        for name in entry.names:
            self.slots[name] = slot
        return slot

    def route(self, model_name: str, *, forwarded: bool = False) -> TestDecision | RemoteDecision:
        self.routed.append((model_name, forwarded))
        if self.route_error is not None:
            raise self.route_error
        slot = self.slots.get(model_name)
        if slot is None:
            raise ModelNotFound(model_name)
        if slot.unavailable is not None:
            raise slot.unavailable
        if slot.remote is not None and not forwarded:
            return RemoteDecision(entry=slot.entry, node=slot.remote)
        return TestDecision(entry=slot.entry, slot=slot, engine=self.engine, cold=slot.model is None)

    async def preload(self, model_name: str) -> RecordingModel:
        decision = self.route(model_name)
        assert isinstance(decision, TestDecision)
        async with decision.acquire() as model:
            assert isinstance(model, RecordingModel)
            return model

    def _listing(self, slot: ModelSlot) -> ModelListing:
        locations = (
            (Location(node=NodeId("n1"), node_name="test-node", status="loaded", memory_mb=1, in_flight=0),)
            if slot.model is not None
            else ()
        )
        return ModelListing(
            id=slot.entry.id,
            created=1_700_000_000,
            owned_by="helexa",
            status="loaded" if slot.model is not None else "unloaded",
            feasible_on=("test-node",),
            locations=locations,
            aliases=slot.entry.aliases,
            entry=slot.entry,
        )

    def list_models(self) -> list[ModelListing]:
        unique = {id(slot): slot for slot in self.slots.values()}
        return [self._listing(slot) for slot in unique.values()]

    def get_model(self, model_name: str) -> ModelListing | None:
        slot = self.slots.get(model_name)
        return None if slot is None else self._listing(slot)


@dataclass(kw_only=True)
class Edge:
    """A running edge server and what the tests poke at."""

    server_url: str
    app: web.Application
    cortex: TestCortex
    metrics: Metrics
    client: openai.AsyncOpenAI  # strict response validation
    lax_client: openai.AsyncOpenAI  # for streamed /v1/completions (strict types reject its chunks)

    @property
    def base_url(self) -> str:
        return f"{self.server_url}/v1"


def make_app(cortex: TestCortex, metrics: Metrics) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=TEST_MAX_BODY_BYTES)
    app[appkeys.CORTEX] = cortex
    app[appkeys.METRICS] = metrics
    app[appkeys.NODE_NAME] = "test-node"
    app[appkeys.KEEPALIVE_INTERVAL_S] = TEST_KEEPALIVE_S
    add_openai_routes(app)
    add_response_headers(app, CorsPolicy())
    return app


@pytest.fixture
async def make_edge(aiohttp_server):
    """Build and start an edge; `configure(app)` may set extra app keys before start."""
    clients: list[openai.AsyncOpenAI] = []

    async def build(
        configure: Callable[[web.Application], None] | None = None,
        api_key: str = "x",
        options: dict[str, object] | None = None,
    ) -> Edge:
        """`options`: the default model's fake-engine script."""
        cortex = TestCortex()
        cortex.add(
            "test/tiny-chat", aliases=("tiny",), defaults={"temperature": 0.25, "top_k": 7}, options=options
        )
        metrics = Metrics(node="test-node")
        app = make_app(cortex, metrics)
        if configure is not None:
            configure(app)
        await cortex.preload("test/tiny-chat")
        server = await aiohttp_server(app)
        url = str(server.make_url("")).rstrip("/")
        client = openai.AsyncOpenAI(
            base_url=f"{url}/v1", api_key=api_key, max_retries=0, _strict_response_validation=True
        )
        lax = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0)
        clients.extend((client, lax))
        return Edge(server_url=url, app=app, cortex=cortex, metrics=metrics, client=client, lax_client=lax)

    yield build
    for client in clients:
        await client.close()


@pytest.fixture
async def edge(make_edge) -> Edge:
    return await make_edge()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A raw HTTP client for what the SDK cannot do (garbage bodies, reading SSE lines one by one)."""
    async with aiohttp.ClientSession() as client:
        yield client
