"""GGUF sources (`engine.gguf`, `engine.sources`): the header reader, the conversion cache, the errors, the
catalogue's `memory_mb` default, and the real SmolLM2 file loaded through the engine."""

from __future__ import annotations

import math
import shutil
import struct
import threading
import time
from pathlib import Path

import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from hypothesis import given, settings
from hypothesis import strategies as st

from helexa.catalogue.entry import ModelEntry
from helexa.catalogue.validate import validate_catalogue
from helexa.engine import gguf
from helexa.engine.base import LoadSpec, ModelId
from helexa.engine.errors import ModelSourceError, TransientLoadError
from helexa.engine.transformers_engine import TransformersEngine
from tests.helpers.engine import collect_deltas, user_request
from tests.helpers.smollm2 import CONTEXT_LENGTH, PARAMETERS, smollm2_gguf

F32, Q8_1 = 0, 9  # ggml tensor type ids; the gguf package cannot dequantize Q8_1


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def gguf_bytes(
    arch: str = "llama", tensors: tuple[tuple[str, tuple[int, ...], int], ...] = (("w", (4, 4), F32),)
) -> bytes:
    """A minimal GGUF v3 file: the architecture, tensor infos, zeroed tensor data."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), 2)
    out += _string("general.architecture") + struct.pack("<I", 8) + _string(arch)
    out += _string(f"{arch}.context_length") + struct.pack("<II", 4, 512)
    offset = 0
    for name, dims, kind in tensors:
        out += _string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", kind, offset)
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        offset += math.prod(dims) // block * size
    return out + b"\0" * (-len(out) % 32) + b"\0" * offset


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


class Converter:
    """Stands in for transformers in cache tests: writes `size` bytes and counts its calls."""

    def __init__(self, size: int = 1000, fail: bool = False) -> None:
        self.size = size
        self.fail = fail
        self.calls = 0

    def __call__(self, gguf_file: Path, out_dir: Path, dtype: str) -> None:
        self.calls += 1
        (out_dir / "model.safetensors").write_bytes(b"x" * self.size)
        if self.fail:
            raise ModelSourceError(f"{gguf_file.name}: conversion failed")


def cached(path: Path, cache: Path, convert: Converter, limit_mb: int = 1000) -> Path:
    return gguf.cached_model_dir(
        path, cache_dir=cache, dtype="float32", limit_mb=limit_mb, report=lambda p: None, convert=convert
    )


# -- the header ------------------------------------------------------------------------------------------


def test_the_header_of_the_real_file() -> None:
    header = gguf.read_header(smollm2_gguf())
    assert header.architecture == "llama"
    assert header.parameters == PARAMETERS
    assert header.context_length == CONTEXT_LENGTH
    assert header.tensor_types == {"Q4_1", "Q8_0", "F32"}
    assert gguf.unsupported_types(header) == []
    # float32 weights (538 MB) and a tenth more.
    assert gguf.memory_mb_estimate(header) == 565


def test_a_file_that_is_not_gguf_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match=r"notes\.gguf: not a readable GGUF file \(no GGUF magic\)"):
        gguf.read_header(write(tmp_path / "notes.gguf", b"hello, world"))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_hostile_headers_give_a_clear_error_or_a_header(
    tmp_path_factory: pytest.TempPathFactory, tail: bytes
) -> None:
    path = tmp_path_factory.mktemp("hostile") / "x.gguf"
    for data in (b"GGUF" + struct.pack("<I", 3) + tail, gguf_bytes()[: len(tail)]):
        path.write_bytes(data)
        started = time.monotonic()
        try:
            gguf.read_header(path)
        except ModelSourceError as exc:
            assert "x.gguf" in str(exc)
        assert time.monotonic() - started < 2.0


def test_the_real_file_cut_short_is_refused(tmp_path: Path) -> None:
    data = smollm2_gguf().read_bytes()
    for cut in (10, 100, 5000, 2**20):
        with pytest.raises(ModelSourceError, match="ends early"):
            gguf.read_header(write(tmp_path / f"cut{cut}.gguf", data[:cut]))
    for cut in (3 * 2**20, len(data) - 1):  # the header whole, the tensor data not
        with pytest.raises(
            ModelSourceError, match=f"cut short: {cut} bytes, its tensors end at byte {len(data)}"
        ):
            gguf.read_header(write(tmp_path / f"cut{cut}.gguf", data[:cut]))


def test_an_unsupported_tensor_type_is_named_before_any_conversion(tmp_path: Path) -> None:
    path = write(tmp_path / "odd.gguf", gguf_bytes(tensors=(("w", (32, 4), Q8_1),)))
    convert = Converter()
    with pytest.raises(ModelSourceError, match=r"odd\.gguf: tensor type\(s\) Q8_1 cannot be dequantized"):
        cached(path, tmp_path / "cache", convert)
    assert convert.calls == 0


def test_an_unsupported_architecture_is_named(tmp_path: Path) -> None:
    """Through transformers itself: its refusal reaches the operator with the file's name."""
    path = write(tmp_path / "alien.gguf", gguf_bytes(arch="nosucharch"))
    with pytest.raises(ModelSourceError, match=r"alien\.gguf: .*architecture nosucharch is not supported"):
        gguf.cached_model_dir(
            path, cache_dir=tmp_path / "cache", dtype="float32", limit_mb=100, report=lambda p: None
        )
    assert not list((tmp_path / "cache").glob("*-float32"))


# -- the cache -------------------------------------------------------------------------------------------


def test_a_second_load_of_the_same_bytes_uses_the_cache(tmp_path: Path) -> None:
    original = write(tmp_path / "a" / "m.gguf", gguf_bytes())
    convert = Converter()
    first = cached(original, tmp_path / "cache", convert)
    assert (first / gguf.ENTRY_MARKER).is_file() and convert.calls == 1
    assert cached(original, tmp_path / "cache", convert) == first
    # Keyed by content: a copy elsewhere, under another name, hits; changed bytes miss.
    copy = shutil.copy(original, tmp_path / "b.gguf")
    assert cached(Path(copy), tmp_path / "cache", convert) == first
    assert convert.calls == 1
    write(original, gguf_bytes(tensors=(("w", (8, 4), F32),)))
    assert cached(original, tmp_path / "cache", convert) != first
    assert convert.calls == 2


def test_the_cache_evicts_the_least_recently_used_beyond_its_bound(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    files = [write(tmp_path / f"m{i}.gguf", gguf_bytes(tensors=(("w", (4, i + 1), F32),))) for i in range(3)]
    convert = Converter(size=400 * 1024)  # three entries of 0.4 MB against a bound of 1 MB
    a = cached(files[0], cache, convert, limit_mb=1)
    b = cached(files[1], cache, convert, limit_mb=1)
    time.sleep(0.02)
    assert cached(files[0], cache, convert, limit_mb=1) == a  # a is now more recent than b
    c = cached(files[2], cache, convert, limit_mb=1)
    assert a.is_dir() and c.is_dir() and not b.exists()
    assert convert.calls == 3
    # The entry being loaded stays even when it alone is over the bound.
    big = cached(files[1], cache, Converter(size=2 * 2**20), limit_mb=1)
    assert big.is_dir() and not a.exists() and not c.exists()


def test_a_failed_conversion_leaves_nothing_behind(tmp_path: Path) -> None:
    path = write(tmp_path / "m.gguf", gguf_bytes())
    cache = tmp_path / "cache"
    with pytest.raises(ModelSourceError, match="conversion failed"):
        cached(path, cache, Converter(fail=True))
    assert sorted(p.name for p in cache.iterdir()) == ["digests.json"]
    convert = Converter()
    assert (cached(path, cache, convert) / gguf.ENTRY_MARKER).is_file() and convert.calls == 1


def test_two_loads_of_one_file_at_once_convert_it_once(tmp_path: Path) -> None:
    path = write(tmp_path / "m.gguf", gguf_bytes())
    convert = Converter()

    def converter(gguf_file: Path, out_dir: Path, dtype: str) -> None:
        time.sleep(0.3)
        convert(gguf_file, out_dir, dtype)

    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(cached(path, tmp_path / "cache", converter)))  # type: ignore[arg-type]
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    assert convert.calls == 1


# -- the catalogue -----------------------------------------------------------------------------------------


def test_catalogue_entries_name_gguf_files(tmp_path: Path) -> None:
    local = smollm2_gguf()
    entries, problems = validate_catalogue(
        {
            "models": [
                {"id": "smol", "source": str(local)},
                {"id": "smol-sized", "source": str(local), "memory_mb": 900},
                {
                    "id": "hub",
                    "source": "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:smollm2-135m-instruct-q8_0.gguf",
                },
                {"id": "mlc", "source": str(local), "engine": "mlc"},
            ]
        },
        file="models.toml",
        base_dir=tmp_path,
    )
    by_id: dict[str, ModelEntry] = {e.id: e for e in entries}
    assert by_id["smol"].memory_mb == 565  # from the file's header
    assert by_id["smol-sized"].memory_mb == 900
    assert by_id["hub"].source.endswith(":smollm2-135m-instruct-q8_0.gguf")
    assert "mlc" not in by_id
    assert [(p.entry, p.field) for p in problems if p.severity == "error"] == [("mlc", "source")]


# -- the real file through the engine ----------------------------------------------------------------------


@pytest.mark.slow
def test_the_conversion_reported_its_phase(smollm2_cache: Path) -> None:
    entries = [p for p in smollm2_cache.iterdir() if (p / gguf.ENTRY_MARKER).is_file()]
    assert [p.name.endswith("-float32") for p in entries] == [True]
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
        f.name for f in entries[0].iterdir()
    }


@pytest.mark.slow
async def test_smollm2_loads_from_the_cache_and_answers(smollm2_cache: Path) -> None:
    seen: list[str] = []
    spec = LoadSpec(model_id=ModelId("smollm2"), source=str(smollm2_gguf()), gguf_cache_dir=smollm2_cache)
    model = await TransformersEngine().load(spec, lambda p: seen.append(p.phase))
    try:
        assert "converting" not in seen  # the session's conversion is reused
        assert model.context_length == CONTEXT_LENGTH
        assert model.memory.total_mb >= 500
        deltas, final = await collect_deltas(
            model, user_request("What is the capital of France?", temperature=0.0, max_tokens=16)
        )
        assert "".join(deltas) == "The capital of France is Paris."
        assert final.finish_reason == "stop"
    finally:
        await model.unload()


def test_a_cache_that_cannot_be_written_is_a_clear_retryable_error(tmp_path: Path) -> None:
    path = write(tmp_path / "m.gguf", gguf_bytes())
    blocked = write(tmp_path / "not-a-folder", b"")  # the cache folder's place is taken by a file
    with pytest.raises(
        TransientLoadError, match=r"m\.gguf: cannot write its converted copy in .*not-a-folder"
    ):
        cached(path, blocked / "cache", Converter())
