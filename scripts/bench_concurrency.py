"""`scripts/bench concurrency`: many streams at once, helexa against `transformers serve` (issue 13).

For each model (the shipped demo model, `builtin:demo`, and the random-weight model shaped like Qwen2.5-0.5B
that `engine.testing` builds once into a cache folder, here with a tokenizer that spells every row of its
head: see `qwen_spelled_dir`), two servers run side by side on loopback ports:

  helexa              a real `helexa agent` process (`--no-mdns`, a catalogue listing the model with
                      `memory_mb` and `context_length`), the model loaded before measuring
  transformers serve  HF's own server, `transformers serve MODEL --continuous-batching`, installed by this
                      bench into its own venv (`.venv-bench/transformers-serve`, from PyPI: `torch==2.13.0`,
                      the CPU build, then `transformers[serving]` at the version helexa uses), with its KV
                      cache capped to helexa's budget (below) and the same dtype as helexa (float32 on CPU)

The client is this process (aiohttp, one keep-alive pool). At each concurrency level (1, 4, 16 streams)
each stream sends its requests one after another (`POST /v1/chat/completions`, `stream: true`,
`stream_options.include_usage`, greedy, the same `max_tokens`, the same prompts in the same order; each
prompt is sent once per server, so no server reuses an earlier identical prompt's KV), and the two servers
take turns: for each round, for each level, helexa then transformers serve or the other way round (the
order alternates with the round and the level), so machine noise hits both. Before measuring, each server
is warmed (1 and 4 streams, 8 tokens) and one greedy request goes to both: the bench prints whether their
texts match (same weights, greedy: they should, so both do the same work).

Reported per model, system and level: aggregate completion tokens/s (completion tokens of all the level's
requests over the summed wall time of its bursts), TTFT p50/p95 (request sent to its first non-empty
content delta), and at 16 streams the CPU seconds the server's process tree spent per 1000 completion
tokens (psutil, the tree sampled before and after each burst: transformers serve runs its model in a
spawned child), and each server tree's peak RSS (sampled every 0.25 s). Each burst's line also shows the
CPU the idle other server spent meanwhile (it should be ~0). Completion tokens come from the `usage` chunk
both servers send; where one is missing the bench counts content chunks instead and says so.

The KV cap: helexa gives a model's batch what its catalogue `memory_mb` leaves after the measured weights
(`engine.transformers_engine._kv_budget_tokens`: budget MB -> KV positions, floored at one full context).
The bench reads the measured memory from the agent's `/mesh/state`, computes the same number of KV
positions, and starts transformers serve with `--cb-block-size 256 --cb-num-blocks N` where N = positions /
256: its paged cache is then N blocks of 256 tokens over every layer (`num_blocks` is a capacity in whole
model blocks; left out, serve sizes the cache from 90 % of the free RAM).

Targets (issue 13): helexa@16 >= 3x helexa@1 on the demo model, >= 2.5x on the 0.5B model; helexa@16 >= 1.0x
transformers serve@16 on both; TTFT p50 @16 <= 1 s on the demo model.

The box is shared and small: run it when it is quiet (the load average is printed at the end). Measured
here, helexa suffered far more than transformers serve from other processes busy on the same cores (its
intra-op thread count changes between prefill and decode): `--helexa-env HELEXA_PREFILL_THREADS=1` and
the like compare thread settings.

    scripts/bench concurrency [--quick] [--skip-peer] [--skip-qwen] [--rounds N] [--levels 1,4,16]
                              [--max-tokens N] [--qwen-max-tokens N] [--requests-per-stream N]
                              [--qwen-requests-per-stream N] [--helexa-env NAME=VALUE ...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helexa.catalogue.validate import builtin_path  # noqa: E402
from helexa.engine.gguf import ENTRY_MARKER  # noqa: E402
from helexa.engine.testing import build_qwen25_05b_shaped  # noqa: E402
from tests.helpers.agentproc import (  # noqa: E402
    AgentProc,
    agent_argv,
    agent_env,
    get_state,
    own_node,
    start_agent,
    stop_agent,
    wait_ready,
)
from tests.helpers.polling import eventually  # noqa: E402
from tests.helpers.ports import free_port  # noqa: E402
from tests.helpers.smollm2 import smollm2_gguf  # noqa: E402

PEER_VENV = ROOT / ".venv-bench" / "transformers-serve"
PEER_TORCH = "torch==2.13.0"  # the CPU build; a plain "torch" would pull a CUDA build of several GB
PEER_PAGE_TOKENS = 256  # transformers' default page size, passed explicitly
HELEXA = "helexa"
PEER = "transformers serve"
TARGET_SCALING = {"demo": 3.0, "qwen": 2.5}
TARGET_VS_PEER = 1.0
TARGET_TTFT_P50_DEMO_S = 1.0

# Different users ask different things: one prompt per stream (round-robin over the requests).
TOPICS = (
    "functions",
    "the sea",
    "a small town",
    "trains",
    "the weather",
    "old books",
    "music",
    "the garden",
    "a long journey",
    "cooking",
    "the night sky",
    "rivers",
    "a quiet morning",
    "friends",
    "the market",
    "winter",
)
PROMPTS = tuple(f"Tell me about {t}, and what people say about it." for t in TOPICS)


# --- the models ---------------------------------------------------------------------------------------------


def qwen_dir() -> Path:
    """The random-weight Qwen2.5-0.5B-shaped model, built once into the user's cache folder."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "helexa" / "bench"
    path = cache / "qwen2.5-0.5b-shaped"
    if not (path / "config.json").is_file():
        print(f"building a random-weight Qwen2.5-0.5B-shaped model in {path} (once) ...", flush=True)
        build_qwen25_05b_shaped(path)
    return path


def qwen_spelled_dir() -> Path:
    """The same model (weights and configs linked, not copied) with a tokenizer that can spell every row of
    its 151,936-row head: the cached model's tokenizer was trained on a little text (some 650 tokens), so
    most ids the head picks decode to no text at all. transformers serve samples from the whole head and
    streams nothing for such ids (no first content delta to time); helexa samples only ids its tokenizer
    has. Spelled out here (`<t123>`, vocabulary entries no merge produces, so prompts tokenize as before),
    both servers pick from the same 151,936 ids, emit the same tokens and stream text for each, as they
    would with the real Qwen2.5 tokenizer (which covers all but a few padding rows)."""
    source = qwen_dir()
    path = source.parent / "qwen2.5-0.5b-shaped-spelled"
    if (path / "tokenizer.json").is_file():
        return path
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name != "tokenizer.json" and not (tmp / item.name).exists():
            (tmp / item.name).symlink_to(item)
    config = json.loads((source / "config.json").read_text())
    rows = int((config.get("text_config") or config)["vocab_size"])
    tok = json.loads((source / "tokenizer.json").read_text())
    vocab: dict[str, int] = tok["model"]["vocab"]
    taken = set(vocab.values()) | {int(a["id"]) for a in tok.get("added_tokens", [])}
    for i in range(rows):
        if i not in taken:
            vocab[f"<t{i}>"] = i
    (tmp / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    tmp.rename(path)
    return path


@dataclass(frozen=True, kw_only=True)
class ModelCase:
    key: str  # "demo" | "qwen": which targets apply
    label: str
    model_id: str  # the id in helexa's catalogue
    source: str  # the catalogue's source
    path: Path  # the model directory (transformers serve loads it)
    memory_mb: int
    context_length: int
    max_tokens: int
    requests_per_stream: int
    # A GGUF source: the agent's GGUF cache holding its converted copy (`path`), so the agent loads it
    # as it would on its second start, not converting it again.
    gguf_cache: Path | None = None


def kv_bytes_per_token(path: Path, element_size: int = 4) -> int:
    """Bytes one token takes in every layer's K and V (float32 on CPU, as both servers run it here); the
    same formula as `engine.kvbatch.kv_bytes_per_token`, from config.json (no torch in this process)."""
    config = json.loads((path / "config.json").read_text())
    text = config.get("text_config") or config
    heads = int(text.get("num_attention_heads", 1))
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // heads)
    return 2 * int(text.get("num_hidden_layers", 1)) * kv_heads * head_dim * element_size


def helexa_kv_tokens(case: ModelCase, used_mb: int) -> int:
    """KV positions helexa's batch may hold for `case` with `used_mb` measured at load (mirrors
    `engine.transformers_engine._kv_budget_tokens`)."""
    config = json.loads((case.path / "config.json").read_text())
    max_pos = int((config.get("text_config") or config).get("max_position_embeddings") or 0)
    tokens = max(0, case.memory_mb - used_mb) * 2**20 // kv_bytes_per_token(case.path)
    return max(int(tokens), max_pos, 1)


# --- measuring one request ----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Reply:
    ttft_s: float
    total_s: float
    tokens: int  # from usage when reported, else the count of content chunks
    from_usage: bool
    text: str


async def one_request(
    http: aiohttp.ClientSession, url: str, model: str, prompt: str, max_tokens: int
) -> Reply:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first: float | None = None
    chunks = 0
    parts: list[str] = []
    usage_tokens: int | None = None
    async with http.post(f"{url}/v1/chat/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"{url}: HTTP {response.status}: {(await response.text())[:500]}")
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            chunk = orjson.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"{url}: stream error: {chunk['error']}")
            for choice in chunk.get("choices") or ():
                if content := (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    parts.append(content)
                    if first is None:
                        first = time.perf_counter()
            if chunk.get("usage"):
                usage_tokens = int(chunk["usage"]["completion_tokens"])
    end = time.perf_counter()
    if first is None:
        first = end  # no content at all (an immediate end): count the whole request as its TTFT
    return Reply(
        ttft_s=first - start,
        total_s=end - start,
        tokens=usage_tokens if usage_tokens is not None else chunks,
        from_usage=usage_tokens is not None,
        text="".join(parts),
    )


# --- one server's process tree ------------------------------------------------------------------------------


def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_cpu_s(pid: int) -> float:
    total = 0.0
    for p in tree(pid):
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def tree_rss_mb(pid: int) -> float:
    total = 0
    for p in tree(pid):
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total / 2**20


@dataclass(kw_only=True)
class Server:
    system: str
    url: str
    model: str  # the "model" field requests send
    pid: int
    kv_tokens: int
    peak_rss_mb: float = 0.0

    def sample_rss(self) -> None:
        self.peak_rss_mb = max(self.peak_rss_mb, tree_rss_mb(self.pid))


@dataclass(kw_only=True)
class Level:
    """What one server did at one concurrency level, over all rounds."""

    replies: list[Reply] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float = 0.0

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.replies)

    @property
    def tps(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else math.nan

    def ttft(self, q: float) -> float:
        return percentile([r.ttft_s for r in self.replies], q)

    @property
    def cpu_per_1k(self) -> float:
        return self.cpu_s / self.tokens * 1000 if self.tokens else math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def prompt_for(tag: str, stream: int, k: int, streams: int) -> str:
    """The prompt of stream `stream`'s `k`-th request in the burst `tag`: the same for both servers, and
    never sent twice to one (its tag first), so no server reuses the KV of an earlier identical prompt
    (helexa keeps recently finished prompts' KV; prefix reuse is a feature of its own, not measured here)."""
    return f"[{tag}.{stream}.{k}] {PROMPTS[(stream + k * streams) % len(PROMPTS)]}"


async def burst(
    http: aiohttp.ClientSession, server: Server, streams: int, case: ModelCase, level: Level, *, tag: str
) -> None:
    """`streams` concurrent streams, each sending `case.requests_per_stream` requests back to back."""

    async def stream(i: int) -> list[Reply]:
        out = []
        for k in range(case.requests_per_stream):
            prompt = prompt_for(tag, i, k, streams)
            out.append(await one_request(http, server.url, server.model, prompt, case.max_tokens))
        return out

    cpu_before = tree_cpu_s(server.pid)
    start = time.perf_counter()
    results = await asyncio.gather(*(stream(i) for i in range(streams)))
    level.wall_s += time.perf_counter() - start
    level.cpu_s += tree_cpu_s(server.pid) - cpu_before
    for replies in results:
        level.replies.extend(replies)


@contextlib.asynccontextmanager
async def rss_sampler(servers: Sequence[Server], every_s: float = 0.25) -> AsyncIterator[None]:
    async def loop() -> None:
        while True:
            for s in servers:
                s.sample_rss()
            await asyncio.sleep(every_s)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# --- helexa -------------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def helexa_server(
    http: aiohttp.ClientSession, case: ModelCase, work: Path, env: dict[str, str]
) -> AsyncIterator[Server]:
    catalogue = work / "models.toml"
    catalogue.write_text(
        "[[models]]\n"
        f'id = "{case.model_id}"\n'
        'engine = "transformers"\n'
        f"source = {json.dumps(case.source)}\n"
        f"memory_mb = {case.memory_mb}\n"
        f"context_length = {case.context_length}\n"
        "keep_alive = -1\n"
    )
    port = free_port()
    if case.gguf_cache is not None:
        (work / "agent").mkdir(parents=True, exist_ok=True)
        (work / "agent" / "gguf").symlink_to(case.gguf_cache, target_is_directory=True)
    argv = agent_argv(
        name="bench",
        port=port,
        host="127.0.0.1",
        state_dir=work / "agent",
        catalogue=catalogue,
        mdns=False,
        extra=("--log-level", "warning"),
    )
    agent = start_agent(
        name="bench",
        url=f"http://127.0.0.1:{port}",
        state_dir=work / "agent",
        argv=argv,
        env=agent_env(work / "agent", env),
    )
    try:
        await wait_ready(http, [agent], timeout_s=60)
        async with http.post(
            f"{agent.url}/mesh/models/load",
            json={"model": case.model_id},
            timeout=aiohttp.ClientTimeout(total=600),
        ) as r:
            if r.status != 200:
                raise RuntimeError(f"helexa: load failed: {r.status} {await r.text()}\n{agent.log_tail()}")
        used_mb = await loaded_memory_mb(http, agent, case.model_id)
        yield Server(
            system=HELEXA,
            url=agent.url,
            model=case.model_id,
            pid=agent.pid,
            kv_tokens=helexa_kv_tokens(case, used_mb),
        )
    finally:
        await asyncio.to_thread(stop_agent, agent)


async def loaded_memory_mb(http: aiohttp.ClientSession, agent: AgentProc, model_id: str) -> int:
    """The memory the agent measured for its loaded copy of `model_id` (its own node record)."""
    found: list[int] = []

    async def loaded() -> tuple[bool, str]:
        node = own_node(await get_state(http, agent.url))
        for m in node.get("models", []):
            if m.get("id") == model_id and m.get("status") == "loaded":
                found.append(int(m.get("memory_mb") or 0))
                return True, ""
        return False, str(node.get("models"))

    await eventually(loaded, timeout_s=30, interval_s=0.1, what=f"{model_id} loaded on the agent")
    return found[0]


# --- transformers serve -------------------------------------------------------------------------------------


def our_transformers_version() -> str:
    from importlib.metadata import version  # noqa: PLC0415 -- only the bench needs it

    return version("transformers")


def ensure_peer_venv() -> Path:
    """The venv with `transformers serve`, created and filled from PyPI on first use; returns its python."""
    python = PEER_VENV / "bin" / "python"
    want = our_transformers_version()
    check = [
        str(python),
        "-c",
        "import torch, transformers, fastapi, uvicorn; print(transformers.__version__)",
    ]
    if python.is_file():
        done = subprocess.run(check, capture_output=True, text=True, check=False)
        if done.returncode == 0 and done.stdout.strip() == want:
            return python
    print(f"installing transformers serve {want} into {PEER_VENV} (once) ...", flush=True)
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, PEER_TORCH], check=True)
    subprocess.run([*pip, f"transformers[serving]=={want}"], check=True)
    subprocess.run(check, check=True, capture_output=True)
    return python


@contextlib.asynccontextmanager
async def peer_server(
    http: aiohttp.ClientSession, case: ModelCase, kv_tokens: int, work: Path
) -> AsyncIterator[Server]:
    python = await asyncio.to_thread(ensure_peer_venv)
    port = free_port()
    num_blocks = max(1, kv_tokens // PEER_PAGE_TOKENS)
    argv = [
        str(python),
        str(python.parent / "transformers"),
        "serve",
        str(case.path),
        "--continuous-batching",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--cb-block-size",
        str(PEER_PAGE_TOKENS),
        "--cb-num-blocks",
        str(num_blocks),
        "--max-model-len",
        str(case.context_length),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    print(f"  transformers serve: {' '.join(argv[2:])}", flush=True)
    log_path = work / "transformers-serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HELEXA_", "PYTHON"))}
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    proc = spawn(argv, log_path, env, work)
    url = f"http://127.0.0.1:{port}"
    try:

        async def ready() -> tuple[bool, str]:
            if proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited with {proc.returncode}:\n{tail(log_path)}")
            async with http.get(f"{url}/v1/models", timeout=aiohttp.ClientTimeout(total=2)) as r:
                return r.status == 200, tail(log_path)

        await eventually(
            ready, timeout_s=300, interval_s=0.25, retry_on=(aiohttp.ClientError,), what="transformers serve"
        )
        yield Server(
            system=PEER, url=url, model=str(case.path), pid=proc.pid, kv_tokens=num_blocks * PEER_PAGE_TOKENS
        )
    finally:
        # Its model runs in a spawned child; end the tree we started, children first.
        for p in reversed(tree(proc.pid)):
            with contextlib.suppress(psutil.Error):
                p.terminate()
        try:
            await asyncio.to_thread(proc.wait, 15)
        except subprocess.TimeoutExpired:
            for p in reversed(tree(proc.pid)):
                with contextlib.suppress(psutil.Error):
                    p.kill()
            await asyncio.to_thread(proc.wait, 5)


def spawn(argv: list[str], log_path: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd
        )


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- one model ----------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class ModelResult:
    case: ModelCase
    servers: list[Server]
    levels: dict[tuple[str, int], Level]


def orders(
    systems: Sequence[Server], rounds: int, levels: Sequence[int]
) -> Iterator[tuple[int, int, list[Server]]]:
    """(round, level, servers in the order they run): the order flips with the round and the level."""
    for r in range(rounds):
        for i, level in enumerate(levels):
            yield r, level, list(systems) if (r + i) % 2 == 0 else list(reversed(systems))


async def bench_model(
    http: aiohttp.ClientSession,
    case: ModelCase,
    *,
    rounds: int,
    levels: Sequence[int],
    skip_peer: bool,
    helexa_env: dict[str, str],
) -> ModelResult:
    print(
        f"\n{case.label}: {rounds} round(s), streams {list(levels)}, max_tokens {case.max_tokens}, "
        f"{case.requests_per_stream} request(s) per stream, greedy",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="helexa-bench-conc-") as tmp:
        work = Path(tmp)
        async with contextlib.AsyncExitStack() as stack:
            t0 = time.perf_counter()
            helexa = await stack.enter_async_context(helexa_server(http, case, work, helexa_env))
            print(
                f"  helexa: loaded in {time.perf_counter() - t0:.1f} s; KV budget {helexa.kv_tokens} tokens"
                f" ({helexa.kv_tokens * kv_bytes_per_token(case.path) / 2**20:.0f} MB)",
                flush=True,
            )
            if helexa_env:
                print(f"  helexa: agent environment {helexa_env}", flush=True)
            servers = [helexa]
            if not skip_peer:
                t0 = time.perf_counter()
                peer = await stack.enter_async_context(peer_server(http, case, helexa.kv_tokens, work))
                print(
                    f"  transformers serve: ready in {time.perf_counter() - t0:.1f} s;"
                    f" KV cap {peer.kv_tokens} tokens"
                    f" ({peer.kv_tokens * kv_bytes_per_token(case.path) / 2**20:.0f} MB)",
                    flush=True,
                )
                servers.append(peer)
            # Warm each server (first-call costs, transformers serve's lazily built CB manager).
            for s in servers:
                warm = dataclasses.replace(case, max_tokens=min(8, case.max_tokens), requests_per_stream=1)
                await burst(http, s, 1, warm, Level(), tag="warm")
                await burst(http, s, 4, warm, Level(), tag="warm")
            if len(servers) > 1:
                # Same weights, same prompt, greedy: the same tokens, so both do the same work.
                texts = [
                    (
                        await one_request(http, s.url, s.model, prompt_for("same", 0, 0, 1), case.max_tokens)
                    ).text
                    for s in servers
                ]
                same = "the same text" if len(set(texts)) == 1 else "DIFFERENT texts"
                print(f"  one greedy request of {case.max_tokens} tokens to each: {same}", flush=True)
                for s, t in zip(servers, texts, strict=True):
                    print(f"    {s.system}: {t[:100]!r}", flush=True)
            levels_out: dict[tuple[str, int], Level] = {
                (s.system, n): Level() for s in servers for n in levels
            }
            async with rss_sampler(servers):
                for r, n, order in orders(servers, rounds, levels):
                    for s in order:
                        level = levels_out[(s.system, n)]
                        before = (level.wall_s, level.tokens, level.cpu_s)
                        others = [o for o in servers if o is not s]
                        others_cpu = sum(tree_cpu_s(o.pid) for o in others)
                        await burst(http, s, n, case, level, tag=f"{r}.{n}")
                        others_cpu = sum(tree_cpu_s(o.pid) for o in others) - others_cpu
                        wall, tokens = level.wall_s - before[0], level.tokens - before[1]
                        print(
                            f"    {s.system:20} @{n:<3} {tokens:5d} tokens in {wall:6.2f} s"
                            f" = {tokens / wall:7.1f} tok/s; CPU {level.cpu_s - before[2]:5.1f} s"
                            + (f" (the idle other server: {others_cpu:.2f} s)" if others else ""),
                            flush=True,
                        )
    return ModelResult(case=case, servers=servers, levels=levels_out)


# --- the report ---------------------------------------------------------------------------------------------


def fmt(v: float, spec: str = ".1f") -> str:
    return "-" if math.isnan(v) else format(v, spec)


def report(results: Sequence[ModelResult], levels: Sequence[int]) -> bool:
    top = max(levels)
    print()
    head = f"{'model':28}{'system':22}" + "".join(f"{f'tok/s @{n}':>12}" for n in levels)
    head += f"{f'TTFT p50 @{top}':>15}{f'p95 @{top}':>10}{f'CPU s/1k tok @{top}':>20}{'peak RSS MB':>13}"
    print(head)
    print("-" * len(head))
    for res in results:
        for i, s in enumerate(res.servers):
            name = res.case.label if i == 0 else ""
            row = f"{name:28}{s.system:22}"
            row += "".join(f"{fmt(res.levels[(s.system, n)].tps):>12}" for n in levels)
            at_top = res.levels[(s.system, top)]
            row += f"{fmt(at_top.ttft(50), '.2f') + ' s':>15}{fmt(at_top.ttft(95), '.2f') + ' s':>10}"
            row += f"{fmt(at_top.cpu_per_1k):>20}{s.peak_rss_mb:>13.0f}"
            print(row)
    print()
    print("TTFT p50 / p95 (s) at every level, and completion tokens counted:")
    for res in results:
        for s in res.servers:
            at = {n: res.levels[(s.system, n)] for n in levels}
            cells = "  ".join(
                f"@{n}: {fmt(at[n].ttft(50), '.2f')}/{fmt(at[n].ttft(95), '.2f')}" for n in levels
            )
            all_replies = [r for n in levels for r in res.levels[(s.system, n)].replies]
            counted = "usage" if all(r.from_usage for r in all_replies) else "content chunks (no usage)"
            tokens = sum(r.tokens for r in all_replies)
            print(
                f"  {res.case.label:26} {s.system:20} {cells}   {tokens} tokens in"
                f" {len(all_replies)} requests (from {counted}); KV cap {s.kv_tokens} tokens"
            )
    print()
    ok = True
    low = min(levels)
    for res in results:
        h = {n: res.levels[(HELEXA, n)] for n in levels}
        scaling = h[top].tps / h[low].tps
        target = TARGET_SCALING.get(res.case.key)
        if target is None:
            print(f"{res.case.label}: helexa @{top} / helexa @{low} = {scaling:.2f}x (no target)")
        else:
            verdict = "ok" if scaling >= target else "MISSED"
            ok &= scaling >= target
            print(
                f"{res.case.label}: helexa @{top} / helexa @{low} = {scaling:.2f}x (target >= {target})"
                f" {verdict}"
            )
        if (PEER, top) in res.levels:
            p = res.levels[(PEER, top)]
            vs = h[top].tps / p.tps
            ok &= vs >= TARGET_VS_PEER or target is None
            verdict = "ok" if vs >= TARGET_VS_PEER else "MISSED"
            print(
                f"{res.case.label}: helexa @{top} / transformers serve @{top} = {vs:.2f}x"
                f" (target >= {TARGET_VS_PEER}) {verdict}"
            )
            peer_scaling = p.tps / res.levels[(PEER, low)].tps
            print(
                f"{res.case.label}: transformers serve @{top} / @{low} = {peer_scaling:.2f}x (for reference)"
            )
            print(
                f"{res.case.label}: CPU per 1000 tokens @{top}: helexa {fmt(h[top].cpu_per_1k)} s,"
                f" transformers serve {fmt(p.cpu_per_1k)} s (ratio {h[top].cpu_per_1k / p.cpu_per_1k:.2f})"
            )
        if res.case.key == "demo":
            p50 = h[top].ttft(50)
            ok &= p50 <= TARGET_TTFT_P50_DEMO_S
            verdict = "ok" if p50 <= TARGET_TTFT_P50_DEMO_S else "MISSED"
            print(
                f"{res.case.label}: helexa TTFT p50 @{top} = {p50:.2f} s"
                f" (target <= {TARGET_TTFT_P50_DEMO_S} s) {verdict}"
            )
    load1, load5, _ = os.getloadavg()
    print(f"load average at the end: {load1:.2f} (1 min), {load5:.2f} (5 min) on {os.cpu_count()} CPUs")
    return ok


# --- entry points -------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Options:
    quick: bool = False
    skip_peer: bool = False
    skip_qwen: bool = False
    rounds: int | None = None  # default 3, quick 1
    levels: tuple[int, ...] = (1, 4, 16)
    max_tokens: int | None = None  # demo: default 128, quick 32
    qwen_max_tokens: int | None = None  # 0.5B: default 32, quick 8
    requests_per_stream: int | None = None  # demo: default 2, quick 1
    qwen_requests_per_stream: int | None = None  # 0.5B: default 1
    helexa_env: tuple[tuple[str, str], ...] = ()  # extra environment of the agent (HELEXA_DECODE_THREADS=2)
    # SmolLM2-135M-Instruct from its GGUF file, converted into this GGUF cache (`scripts/bench engine`).
    smollm2_cache: Path | None = None
    smollm2_max_tokens: int | None = None  # default 64, quick 16


def smollm2_case(cache: Path, max_tokens: int) -> ModelCase:
    """The real pretrained model (tests/helpers/smollm2.py): helexa serves the GGUF file (from `cache`,
    converted), transformers serve the converted directory: the same weights."""
    (converted,) = [p for p in cache.iterdir() if (p / ENTRY_MARKER).is_file()]
    return ModelCase(
        key="smollm2",
        label="SmolLM2-135M-Instruct (GGUF)",
        model_id="smollm2",
        source=str(smollm2_gguf()),
        path=converted,
        memory_mb=1100,  # ~520 MB measured + ~580 MB of KV budget
        context_length=2048,
        max_tokens=max_tokens,
        requests_per_stream=1,
        gguf_cache=cache,
    )


def pick(value: int | None, full: int, quick: int, is_quick: bool) -> int:
    return value if value is not None else (quick if is_quick else full)


async def run_section(opts: Options) -> bool:
    """Run the concurrency section; True when every target held."""
    quick = opts.quick
    rounds = pick(opts.rounds, 3, 1, quick)
    levels = sorted(set(opts.levels))
    demo = builtin_path("demo")
    cases: list[ModelCase] = []
    if (demo / "config.json").is_file():
        cases.append(
            ModelCase(
                key="demo",
                label="helexa/demo (4.5M)",
                model_id="helexa/demo",
                source="builtin:demo",
                path=demo,
                memory_mb=200,
                context_length=512,
                max_tokens=pick(opts.max_tokens, 128, 32, quick),
                requests_per_stream=pick(opts.requests_per_stream, 2, 1, quick),
            )
        )
    else:
        print(f"demo model not installed ({demo}); skipped")
    if not opts.skip_qwen:
        path = await asyncio.to_thread(qwen_spelled_dir)
        cases.append(
            ModelCase(
                key="qwen",
                label="Qwen2.5-0.5B-shaped (random)",
                model_id="bench/qwen2.5-0.5b-shaped",
                source=str(path),
                path=path,
                memory_mb=3000,  # ~1.9 GB of float32 weights + ~1 GB of KV budget
                context_length=2048,
                max_tokens=pick(opts.qwen_max_tokens, 32, 8, quick),
                requests_per_stream=pick(opts.qwen_requests_per_stream, 1, 1, quick),
            )
        )
    if opts.smollm2_cache is not None:
        cases.append(smollm2_case(opts.smollm2_cache, pick(opts.smollm2_max_tokens, 64, 16, quick)))
    if not cases:
        print("nothing benchmarked")
        return False
    print(
        f"\nconcurrency: helexa{'' if opts.skip_peer else ' vs transformers serve --continuous-batching'}, "
        f"aggregate completion tok/s and TTFT at {levels} concurrent streams"
    )
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=900)
    results = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        for case in cases:
            results.append(
                await bench_model(
                    http,
                    case,
                    rounds=rounds,
                    levels=levels,
                    skip_peer=opts.skip_peer,
                    helexa_env=dict(opts.helexa_env),
                )
            )
    return report(results, levels)


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/bench concurrency", description=__doc__.splitlines()[0] if __doc__ else ""
    )
    parser.add_argument("--quick", action="store_true", help="one round, short requests (a few minutes)")
    parser.add_argument("--skip-peer", action="store_true", help="helexa only (no transformers serve)")
    parser.add_argument("--skip-qwen", action="store_true", help="the demo model only")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3, quick 1)")
    parser.add_argument("--levels", default="1,4,16", help="concurrent streams (comma-separated)")
    parser.add_argument("--max-tokens", type=int, help="per request, demo model (default 128, quick 32)")
    parser.add_argument("--qwen-max-tokens", type=int, help="per request, 0.5B model (default 32, quick 8)")
    parser.add_argument("--requests-per-stream", type=int, help="demo model (default 2, quick 1)")
    parser.add_argument("--qwen-requests-per-stream", type=int, help="0.5B model (default 1)")
    parser.add_argument(
        "--helexa-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment of the agent, e.g. HELEXA_DECODE_THREADS=2 (repeat)",
    )
    a = parser.parse_args()
    opts = Options(
        quick=a.quick,
        skip_peer=a.skip_peer,
        skip_qwen=a.skip_qwen,
        rounds=a.rounds,
        levels=tuple(int(n) for n in a.levels.split(",") if n.strip()),
        max_tokens=a.max_tokens,
        qwen_max_tokens=a.qwen_max_tokens,
        requests_per_stream=a.requests_per_stream,
        qwen_requests_per_stream=a.qwen_requests_per_stream,
        helexa_env=tuple((k, v) for k, _, v in (kv.partition("=") for kv in a.helexa_env)),
    )
    return 0 if asyncio.run(run_section(opts)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
