"""`scripts/bench grammar`: what grammar-constrained decoding costs per token (structured output, tools).

For the demo model's tokenizer (4 096 entries) and the Qwen2.5-0.5B-shaped model `scripts/bench engine`
builds (its compute shape; its tokenizer is a small random one, so the large-vocabulary case is not
measured here), it measures, over many steps of a random walk through the grammar: compiling a JSON
schema, the mask per token (`GrammarConstraint.mask` on a logits row: llguidance's bitmask plus applying
it), and `accept`. Numbers are medians and p95 in milliseconds.

    scripts/bench grammar [--steps N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helexa.catalogue.validate import builtin_path  # noqa: E402
from helexa.engine.base import ResponseFormat  # noqa: E402
from helexa.engine.grammar import compile_format  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 5},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}}},
    },
    "required": ["name", "age", "tags"],
}


def _ms(values: list[float]) -> str:
    values = sorted(values)
    return (
        f"p50 {statistics.median(values) * 1000:.3f} ms, p95 {values[int(len(values) * 0.95)] * 1000:.3f} ms"
    )


def bench(label: str, tokenizer_dir: Path, steps: int) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    started = time.perf_counter()
    factory = compile_format(tokenizer, ResponseFormat(type="json_schema", schema=SCHEMA))
    first = time.perf_counter() - started  # includes building llguidance's tokenizer view once per model
    compiles = []
    for _ in range(20):
        started = time.perf_counter()
        compile_format(tokenizer, ResponseFormat(type="json_schema", schema=SCHEMA))
        compiles.append(time.perf_counter() - started)
    masks: list[float] = []
    accepts: list[float] = []
    generator = torch.Generator().manual_seed(0)
    vocab = len(tokenizer)
    while len(masks) < steps:
        constraint = factory()
        constraint.remaining(10_000)
        for _ in range(200):
            logits = torch.randn(vocab, generator=generator)
            started = time.perf_counter()
            constraint.mask(logits)
            masks.append(time.perf_counter() - started)
            token = int(torch.argmax(logits))
            started = time.perf_counter()
            constraint.accept(token)
            accepts.append(time.perf_counter() - started)
            if constraint.done:
                break
    print(f"{label} (vocabulary {vocab}):")
    print(
        f"  first compile (with the tokenizer view): {first * 1000:.1f} ms; later compiles: {_ms(compiles)}"
    )
    print(f"  mask per token: {_ms(masks)} over {len(masks)} tokens; accept: {_ms(accepts)}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    bench("demo model", builtin_path("demo"), args.steps)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "helexa" / "bench"
    qwen = cache / "qwen2.5-0.5b-shaped"  # where `scripts/bench engine` builds it
    if (qwen / "tokenizer.json").is_file():
        bench("Qwen2.5-0.5B-shaped (small tokenizer)", qwen, args.steps)
    else:
        print("Qwen2.5-shaped model not built yet (run `scripts/bench engine` once); skipped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
