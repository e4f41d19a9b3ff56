"""Validation: every field, problems that name file/entry/field, and the fuzz property."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from helexa import catalogue
from helexa.catalogue.durations import format_keep_alive, parse_keep_alive
from helexa.catalogue.entry import DEFAULT_KEEP_ALIVE_S
from helexa.catalogue.validate import (
    FIELDS,
    Problem,
    builtin_path,
    check_name,
    parse_entry,
    validate_catalogue,
)
from tests.helpers.strategies import (
    SHARED_MACHINE,
    fuzzed_entry_tables,
    keep_alive_values,
    valid_entry_tables,
)


def parse(table: dict[str, object], base_dir: Path | None = None):
    return parse_entry(table, file="models.toml", index=3, base_dir=base_dir)


def only_problem(table: dict[str, object]) -> Problem:
    entry, problems = parse(table)
    assert entry is None
    assert len(problems) == 1, problems
    return problems[0]


def test_problem_names_file_entry_and_field() -> None:
    problem = only_problem({"id": "Qwen/Qwen2.5-7B", "source": "Qwen/Qwen2.5-7B", "memory_mb": "lots"})
    assert str(problem) == (
        'models.toml: entry "Qwen/Qwen2.5-7B" field memory_mb: must be a non-negative integer, got "lots"'
    )
    assert (problem.file, problem.entry, problem.field, problem.severity) == (
        "models.toml",
        "Qwen/Qwen2.5-7B",
        "memory_mb",
        "error",
    )


def test_entry_without_usable_id_is_named_by_position() -> None:
    problem = only_problem({"id": "../etc", "source": "a/b"})
    assert problem.entry == 3
    assert str(problem).startswith("models.toml: entry #3 field id: must not contain '..'")


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("engine", "vllm", "must be one of auto, mlc, transformers, fake"),
        ("memory_mb", -1, "non-negative integer"),
        ("memory_mb", True, "non-negative integer"),
        ("memory_mb", 1.5, "non-negative integer"),
        ("min_devices", 0, ">= 1"),
        ("min_device_memory_mb", "8G", "non-negative integer"),
        ("pinned_on", "beast", "array of strings"),
        ("pinned_on", ["beast", 3], "non-empty strings"),
        ("resident", "yes", "true or false"),
        ("preload", 1, "true or false"),
        ("aliases", ["/abs"], "must not start with '/'"),
        ("keep_alive", "soon", "duration"),
        ("keep_alive", -5, "-1 for never"),
        ("context_length", 0, ">= 1"),
        ("defaults", [], "must be a table"),
        ("version", 0, ">= 1"),
        ("options", "fast", "must be a table"),
        ("options", {"x": float("nan")}, "finite"),
        ("revision", "", "non-empty string"),
        ("quant", 4, "non-empty string"),
        ("source", "https://example.com/x", "local path, org/name"),
        ("source", "builtin:../x", "plain directory name"),
        ("source", "HF://nope", "org/name"),
    ],
)
def test_bad_field_is_reported_by_name(field: str, value: object, fragment: str) -> None:
    problem = only_problem({"id": "m", "source": "org/m", field: value})
    assert problem.field == field
    assert fragment in problem.message


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("temperature", 2.5, "from 0 to 2"),
        ("top_p", 0, "greater than 0"),
        ("top_k", -1, "non-negative"),
        ("max_tokens", 0, ">= 1"),
        ("temperature", "hot", "from 0 to 2"),
    ],
)
def test_defaults_ranges(key: str, value: object, fragment: str) -> None:
    problem = only_problem({"id": "m", "source": "org/m", "defaults": {key: value}})
    assert problem.field == f"defaults.{key}"
    assert fragment in problem.message


def test_every_field_parses() -> None:
    entry, problems = parse(
        {
            "id": "Qwen/Qwen2.5-7B-Instruct",
            "engine": "mlc",
            "source": "HF://mlc-ai/Qwen2.5-7B-Instruct-q4f16_1-MLC",
            "revision": "main",
            "quant": "q4f16_1",
            "memory_mb": 6000,
            "min_devices": 2,
            "min_device_memory_mb": 8000,
            "pinned_on": ["beast", "n-123"],
            "resident": True,
            "aliases": ["qwen-7b", "qwen"],
            "keep_alive": "1h30m",
            "preload": True,
            "context_length": 32768,
            "defaults": {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "max_tokens": 512},
            "version": 7,
            "options": {"script": ["a", "b"], "delay_s": 0.01},
        }
    )
    assert problems == ()
    assert entry is not None
    assert entry.source == "HF://mlc-ai/Qwen2.5-7B-Instruct-q4f16_1-MLC"
    assert entry.pinned_on == ("beast", "n-123")
    assert entry.aliases == ("qwen-7b", "qwen")
    assert entry.keep_alive_s == 5400.0
    assert entry.defaults == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "max_tokens": 512}
    assert entry.options == {"script": ["a", "b"], "delay_s": 0.01}
    assert entry.version == 7
    assert entry.names == ("Qwen/Qwen2.5-7B-Instruct", "qwen-7b", "qwen")


def test_minimal_entry_gets_defaults() -> None:
    entry, problems = parse({"id": "m", "source": "org/m"})
    assert problems == ()
    assert entry is not None
    assert (entry.engine, entry.version, entry.min_devices, entry.keep_alive_s) == (
        "auto",
        1,
        1,
        DEFAULT_KEEP_ALIVE_S,
    )


def test_source_is_required_except_for_fake() -> None:
    assert only_problem({"id": "m"}).field == "source"
    entry, problems = parse({"id": "m", "engine": "fake"})
    assert entry is not None and entry.source == "" and problems == ()


def test_unknown_key_is_a_warning_and_the_entry_is_kept() -> None:
    entry, problems = parse({"id": "m", "source": "org/m", "memroy_mb": 5})
    assert entry is not None
    assert [(p.field, p.severity) for p in problems] == [("memroy_mb", "warning")]
    assert "did you mean memory_mb?" in problems[0].message


def test_relative_local_source_resolves_against_the_catalogue_folder(tmp_path: Path) -> None:
    (tmp_path / "weights" / "tiny").mkdir(parents=True)
    entry, _ = parse({"id": "m", "source": "weights/tiny"}, base_dir=tmp_path)
    assert entry is not None and entry.source == str(tmp_path / "weights" / "tiny")
    entry, _ = parse({"id": "m", "source": "./x/../y"}, base_dir=tmp_path)
    assert entry is not None and entry.source == str(tmp_path / "y")
    # `org/name` that is not a local directory is a Hugging Face repo id, kept as written.
    entry, _ = parse({"id": "m", "source": "Qwen/Qwen2.5-0.5B"}, base_dir=tmp_path)
    assert entry is not None and entry.source == "Qwen/Qwen2.5-0.5B"
    # Without a file to resolve against (an entry from a peer) a relative path is an error.
    assert only_problem({"id": "m", "source": "./weights"}).field == "source"


def test_sources_from_the_network_are_confined_to_the_model_roots(tmp_path: Path) -> None:
    """A peer's (or the API's) local source must be inside a model root, symbolic links resolved; the
    refusal says the same whether or not the path exists. Repo ids, `builtin:` and the fake engine are not
    paths. Without roots (the operator's own file) nothing is confined."""
    root = tmp_path / "models"
    (root / "real").mkdir(parents=True)
    outside = tmp_path / "secret"
    outside.mkdir()
    (root / "link").symlink_to(outside)

    def confined(source: str, engine: str = "transformers") -> tuple[str | None, list[str]]:
        entry, problems = parse_entry(
            {"id": "m", "engine": engine, "source": source}, file="peer", index=1, base_dir=None, roots=[root]
        )
        return (entry.source if entry else None), [p.message for p in problems if p.severity == "error"]

    assert confined(str(root / "real")) == (str(root / "real"), [])
    assert confined(str(root / "not-yet")) == (str(root / "not-yet"), [])  # loading says if it is there
    refusals = [
        confined(source)
        for source in (
            str(outside),
            str(tmp_path / "nowhere"),
            "/etc",
            str(root / "link"),
            str(root / ".." / "x"),
        )
    ]
    assert all(entry is None for entry, _ in refusals)
    assert len({tuple(messages) for _, messages in refusals}) == 1  # one message, existing or not
    assert "model roots" in refusals[0][1][0] and str(outside) not in refusals[0][1][0]
    assert confined("org/name") == ("org/name", [])
    assert confined("HF://org/name") == ("HF://org/name", [])
    assert confined("builtin:demo")[1] == []
    assert confined("/anywhere", engine="fake") == ("/anywhere", [])  # the fake engine opens nothing
    entry, problems = parse_entry({"id": "m", "source": str(outside)}, file="f", index=1, base_dir=None)
    assert entry is not None and entry.source == str(outside) and not problems


def test_builtin_source_resolves_inside_the_installed_package() -> None:
    package_dir = Path(catalogue.__file__).parent
    assert builtin_path("demo") == package_dir / "demo"
    entry, _problems = parse({"id": "helexa/demo", "source": "builtin:demo"})
    assert entry is not None
    assert entry.source == str(package_dir / "demo")
    assert entry.source_spec == "builtin:demo"


@pytest.mark.parametrize("name", ["", "/abs", "a/../b", "..", "a\nb", " a", "a" * 257, "a\\b", 5])
def test_unsafe_names(name: object) -> None:
    assert check_name(name) is not None


def test_catalogue_duplicates_and_alias_collisions() -> None:
    entries, problems = validate_catalogue(
        {
            "models": [
                {"id": "a", "engine": "fake", "aliases": ["x", "b"]},
                {"id": "b", "engine": "fake", "aliases": ["x", "y"]},
                {"id": "a", "engine": "fake"},
                {"id": "c", "engine": "fake", "memory_mb": "lots"},
            ],
            "modles": [],
        },
        file="models.toml",
        base_dir=None,
    )
    assert [e.id for e in entries] == ["a", "b"]
    assert entries[0].aliases == ("x",)  # "b" is another entry's id
    assert entries[1].aliases == ("y",)  # "x" was claimed first by "a"
    rendered = [str(p) for p in problems]
    assert 'models.toml: entry "a" field id: duplicate id (first defined in entry #1); skipped' in rendered
    assert any(p.entry == "c" and p.field == "memory_mb" and p.severity == "error" for p in problems)
    assert any(p.field == "modles" and p.severity == "warning" for p in problems)
    assert sum(p.field == "aliases" for p in problems) == 2


def test_models_must_be_an_array() -> None:
    entries, problems = validate_catalogue({"models": {"id": "a"}}, file="f.toml", base_dir=None)
    assert entries == ()
    assert problems[0].field == "models"


@SHARED_MACHINE
@given(fuzzed_entry_tables())
def test_validation_never_raises_and_names_real_fields(table: dict[object, object]) -> None:
    entry, problems = parse_entry(table, file="models.toml", index=1, base_dir=None)
    if entry is None:
        assert any(p.severity == "error" for p in problems)
    else:
        assert all(p.severity == "warning" for p in problems)
    given_keys = {k if isinstance(k, str) and k.isprintable() else repr(k) for k in table}
    for problem in problems:
        assert problem.file == "models.toml"
        assert problem.field is not None
        assert problem.field in FIELDS or problem.field.startswith("defaults.") or problem.field in given_keys
        assert problem.entry in (1, table.get("id"))
        assert str(problem).startswith("models.toml: entry ")


@SHARED_MACHINE
@given(valid_entry_tables())
def test_valid_tables_validate_cleanly(table: dict[str, object]) -> None:
    entry, problems = parse_entry(table, file="models.toml", index=1, base_dir=None)
    assert entry is not None, problems
    assert all(p.severity == "warning" and p.field == "source" for p in problems)  # builtin not installed


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30m", 1800.0),
        ("1h30m", 5400.0),
        ("45s", 45.0),
        (0, 0.0),
        (-1, None),
        ("-1", None),
        (90, 90.0),
        ("500ms", 0.5),
        ("2d", 172800.0),
        ("1.5h", 5400.0),
        (2.5, 2.5),
    ],
)
def test_keep_alive_forms(text: object, seconds: float | None) -> None:
    assert parse_keep_alive(text) == seconds


@pytest.mark.parametrize("bad", ["soon", "", "1x", "m30", -2, True, float("inf"), [30], "1h 30m"])
def test_keep_alive_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="must be"):
        parse_keep_alive(bad)


@SHARED_MACHINE
@given(keep_alive_values())
def test_keep_alive_format_round_trip(value: object) -> None:
    seconds = parse_keep_alive(value)
    assert parse_keep_alive(format_keep_alive(seconds)) == seconds


@SHARED_MACHINE
@given(st.floats(min_value=0, allow_infinity=False))
def test_keep_alive_format_round_trip_any_seconds(seconds: float) -> None:
    again = parse_keep_alive(format_keep_alive(seconds))
    assert again == seconds and again is not None and not math.isnan(again)
