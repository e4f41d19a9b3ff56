"""Downloads from a Hugging Face hub (`engine.download`), against the fake hub of `tests.helpers.hub`: a
real aiohttp server on 127.0.0.1 that huggingface_hub talks to over HTTP, as it would to the real hub."""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import huggingface_hub.constants
import pytest

from helexa.engine import download
from helexa.engine.base import LoadProgress, LoadSpec, ModelId
from helexa.engine.errors import ModelSourceError, TransientLoadError
from helexa.engine.transformers_engine import TransformersEngine
from tests.helpers.engine import collect, user_request
from tests.helpers.hub import FakeHub, serve_in_thread

REPO = "helexa/tiny"
ALL = ("*",)
WEIGHTS = "model.safetensors"


@pytest.fixture(autouse=True)
def _isolated_hub_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """No token or offline switch from the environment of whoever runs the tests, and quick retries."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(download, "RETRY_WAIT_S", 0.05)


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with serve_in_thread(FakeHub()) as running:
        yield running


def write_repo(directory: Path, *, weights: bytes, config: str = '{"model_type": "fake"}') -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(config)
    (directory / WEIGHTS).write_bytes(weights)
    return directory


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def size_of(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


class Recorder:
    """A progress callback that notes when each report came."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, LoadProgress]] = []

    def __call__(self, progress: LoadProgress) -> None:
        self.seen.append((time.monotonic(), progress))

    @property
    def progress(self) -> list[LoadProgress]:
        return [p for _, p in self.seen]


def fetch(hub: FakeHub, cache: Path, *, repo: str = REPO, revision: str | None = None, report=None) -> Path:
    return download.fetch_snapshot(
        repo,
        revision=revision,
        cache_dir=cache,
        allow_patterns=ALL,
        report=report or Recorder(),
        endpoint=hub.url,
    )


def info_requests(hub: FakeHub) -> int:
    """How often the hub was asked which commit a revision names (`model_info`)."""
    return len(hub.seen("GET", "/revision/"))


def resolve_gets(hub: FakeHub, filename: str) -> list[str | None]:
    """The Range header of every GET of `filename` the hub saw (None: the whole file)."""
    return [r.range for r in hub.seen("GET", "/resolve/") if r.path.endswith("/" + filename)]


# -- the engine loads a repo id from the hub --------------------------------------------------------------


async def test_a_repo_id_downloads_from_the_hub_and_generates(
    hub: FakeHub, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.add_repo(REPO, tiny_model_dir)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # read at each fetch, as an operator's mirror is
    seen: list[LoadProgress] = []
    model = await TransformersEngine().load(
        LoadSpec(model_id=ModelId(REPO), source=REPO, cache_dir=tmp_path), progress=seen.append
    )
    try:
        _, final = await collect(model, user_request(max_tokens=2))
        assert final.usage.completion_tokens == 2
    finally:
        await model.unload()
    downloading = [p for p in seen if p.phase == "downloading"]
    assert downloading[-1].done_bytes == downloading[-1].total_bytes == size_of(tiny_model_dir)
    snapshot = tmp_path / "models--helexa--tiny" / "snapshots" / hub.repos[REPO].sha()
    assert digest(snapshot / WEIGHTS) == digest(tiny_model_dir / WEIGHTS)


async def test_the_event_loop_keeps_ticking_while_a_model_downloads(
    hub: FakeHub, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.add_repo(REPO, tiny_model_dir, bytes_per_s=size_of(tiny_model_dir) / 1.2)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    gaps: list[float] = []
    stop = asyncio.Event()

    async def tick() -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    began = time.monotonic()
    try:
        model = await TransformersEngine().load(
            LoadSpec(model_id=ModelId(REPO), source=REPO, cache_dir=tmp_path)
        )
    finally:
        stop.set()
        await ticker
    await model.unload()
    assert time.monotonic() - began > 1.0, "the download was not slow enough to tell"
    assert len(gaps) > 50
    assert max(gaps) < 0.2, f"the event loop stalled for {max(gaps):.3f} s"


# -- progress ---------------------------------------------------------------------------------------------


def test_progress_is_visible_while_the_download_runs(
    hub: FakeHub, tiny_model_dir: Path, tmp_path: Path
) -> None:
    total = size_of(tiny_model_dir)
    hub.add_repo(REPO, tiny_model_dir, bytes_per_s=total / 1.5)
    recorder = Recorder()
    fetch(hub, tmp_path, report=recorder)
    ended = time.monotonic()

    assert all(p.phase == "downloading" and p.total_bytes == total for p in recorder.progress)
    first, last = recorder.progress[0], recorder.progress[-1]
    assert first.done_bytes == 0 and first.fraction == 0.0
    assert last.done_bytes == total and last.fraction == 1.0
    done = [p.done_bytes or 0 for p in recorder.progress]
    assert done == sorted(done), "bytes done never go back"
    during = [(t, p) for t, p in recorder.seen if 0 < (p.done_bytes or 0) < total]
    assert len(during) >= 3, f"only {len(during)} reports while bytes came in"
    for _, p in during:
        assert p.bytes_per_s is not None and p.bytes_per_s > 0
        assert p.eta_s is not None and math.isfinite(p.eta_s) and p.eta_s > 0
        assert p.fraction == pytest.approx((p.done_bytes or 0) / total)
    # Reported as the bytes came, not at the end: spread over most of the 1.5 s the transfer took.
    assert during[-1][0] - during[0][0] > 0.6
    assert ended - during[0][0] > 0.8
    # The rate is the throttle's, give or take scheduling.
    assert during[-1][1].bytes_per_s == pytest.approx(total / 1.5, rel=0.5)


# -- resuming ---------------------------------------------------------------------------------------------


def test_a_connection_broken_mid_file_resumes_with_a_range_request(
    hub: FakeHub, tiny_model_dir: Path, tmp_path: Path
) -> None:
    hub.add_repo(REPO, tiny_model_dir)
    cut = 300_000
    hub.break_file(REPO, WEIGHTS, after_bytes=cut)
    path = fetch(hub, tmp_path)
    assert resolve_gets(hub, WEIGHTS) == [None, f"bytes={cut}-"]
    assert digest(path / WEIGHTS) == digest(tiny_model_dir / WEIGHTS)


def test_a_failed_attempt_leaves_its_partial_file_and_the_next_one_resumes_it(
    hub: FakeHub, tmp_path: Path
) -> None:
    weights = os.urandom(400_000)
    repo = hub.add_repo(REPO, write_repo(tmp_path / "repo", weights=weights))
    cut = 150_000
    hub.break_file(REPO, WEIGHTS, after_bytes=cut, then_status=503)  # the hub goes bad after the break
    cache = tmp_path / "cache"
    with pytest.raises(TransientLoadError, match=REPO):
        fetch(hub, cache)
    partial = cache / "models--helexa--tiny" / "blobs" / f"{hashlib.sha256(weights).hexdigest()}.incomplete"
    assert partial.stat().st_size == cut

    recorder = Recorder()
    path = fetch(hub, cache, report=recorder)
    assert resolve_gets(hub, WEIGHTS)[-1] == f"bytes={cut}-"
    assert (path / WEIGHTS).read_bytes() == weights
    assert not partial.exists()
    # What the partial file held counts as done from the start.
    assert (recorder.progress[0].done_bytes or 0) >= cut
    assert path.name == repo.sha()


def test_a_file_of_a_size_the_hub_does_not_say_still_downloads_with_progress(
    hub: FakeHub, tmp_path: Path
) -> None:
    """huggingface_hub's own download takes such a file (it cannot be resumed without knowing its end)."""
    weights = os.urandom(120_000)
    directory = write_repo(tmp_path / "repo", weights=weights)
    hub.add_repo(REPO, directory, head_without_size=True)
    recorder = Recorder()
    path = fetch(hub, tmp_path / "cache", report=recorder)
    assert (path / WEIGHTS).read_bytes() == weights
    first, last = recorder.progress[0], recorder.progress[-1]
    assert first.total_bytes is None and first.fraction is None, "no made-up total"
    assert last.done_bytes == last.total_bytes == size_of(directory)


# -- revisions --------------------------------------------------------------------------------------------


def test_the_revision_asked_for_is_the_one_downloaded(hub: FakeHub, tmp_path: Path) -> None:
    old, new = os.urandom(50_000), os.urandom(60_000)
    repo = hub.add_repo(
        REPO,
        {
            "main": write_repo(tmp_path / "main", weights=old),
            "v2": write_repo(tmp_path / "v2", weights=new, config='{"model_type": "fake", "v": 2}'),
        },
    )
    cache = tmp_path / "cache"
    main = fetch(hub, cache)
    v2 = fetch(hub, cache, revision="v2")
    pinned = fetch(hub, cache, revision=repo.sha("v2"))
    assert (main / WEIGHTS).read_bytes() == old
    assert (v2 / WEIGHTS).read_bytes() == new
    assert main.name == repo.sha("main") and v2.name == pinned.name == repo.sha("v2")
    refs = cache / "models--helexa--tiny" / "refs"
    assert (refs / "main").read_text() == repo.sha("main")
    assert (refs / "v2").read_text() == repo.sha("v2")

    with pytest.raises(ModelSourceError, match="no revision 'v3'"):
        fetch(hub, cache, revision="v3")


# -- the hub says no --------------------------------------------------------------------------------------


def test_a_repo_the_hub_does_not_have_is_a_model_source_error(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="helexa/nowhere is not on"):
        fetch(hub, tmp_path, repo="helexa/nowhere")


def test_a_gated_repo_needs_a_token_and_honours_hf_token(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.add_repo(REPO, write_repo(tmp_path / "repo", weights=b"w" * 1000), gated=True, token="hf_letmein")
    with pytest.raises(ModelSourceError, match=f"{REPO} is gated.*HF_TOKEN"):
        fetch(hub, tmp_path / "cache")
    assert hub.seen("GET", "/resolve/") == []

    monkeypatch.setenv("HF_TOKEN", "hf_letmein")
    path = fetch(hub, tmp_path / "cache")
    assert (path / WEIGHTS).read_bytes() == b"w" * 1000
    assert {r.authorization for r in hub.seen("GET", "/resolve/")} == {"Bearer hf_letmein"}


def test_not_enough_disk_fails_before_anything_is_downloaded(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.add_repo(REPO, write_repo(tmp_path / "repo", weights=os.urandom(2_500_000)))
    monkeypatch.setattr(download, "free_bytes", lambda folder: 1_200_000)
    cache = tmp_path / "cache"
    with pytest.raises(ModelSourceError) as caught:
        fetch(hub, cache)
    message = str(caught.value)
    assert REPO in message
    assert "needs 2.5 MB" in message and "1.2 MB free" in message and str(cache) in message
    assert hub.seen("GET", "/resolve/") == []
    assert not (cache / "models--helexa--tiny" / "blobs").exists()


# -- single flight ----------------------------------------------------------------------------------------


def test_concurrent_fetches_of_one_repo_share_one_download(
    hub: FakeHub, tiny_model_dir: Path, tmp_path: Path
) -> None:
    total = size_of(tiny_model_dir)
    hub.add_repo(REPO, tiny_model_dir, bytes_per_s=total / 1.0)
    recorders = [Recorder(), Recorder()]
    start = threading.Barrier(2)

    def one(recorder: Recorder) -> Path:
        start.wait()
        return fetch(hub, tmp_path, report=recorder)

    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(one, recorders))

    assert paths[0] == paths[1]
    assert info_requests(hub) == 1, "the second fetch asked the hub itself"
    for name in os.listdir(tiny_model_dir):
        assert len(resolve_gets(hub, name)) == 1, f"{name} was fetched more than once"
    for recorder in recorders:
        assert any(0 < (p.done_bytes or 0) < total for p in recorder.progress), "a waiter saw no progress"
        assert recorder.progress[-1].done_bytes == total


def test_a_failed_download_fails_every_waiter_and_a_later_call_starts_afresh(
    hub: FakeHub, tmp_path: Path
) -> None:
    weights = os.urandom(300_000)
    hub.add_repo(REPO, write_repo(tmp_path / "repo", weights=weights), bytes_per_s=600_000)
    hub.break_file(REPO, WEIGHTS, after_bytes=200_000, then_status=503)
    start = threading.Barrier(2)

    def one(_: int) -> Path | BaseException:
        start.wait()
        try:
            return fetch(hub, tmp_path / "cache")
        except TransientLoadError as exc:
            return exc

    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(one, range(2)))
    assert all(isinstance(o, TransientLoadError) for o in outcomes), outcomes
    assert outcomes[0] is not outcomes[1]
    assert info_requests(hub) == 1

    path = fetch(hub, tmp_path / "cache")
    assert (path / WEIGHTS).read_bytes() == weights


# -- offline ----------------------------------------------------------------------------------------------


def test_a_cached_snapshot_loads_without_the_hub(tiny_model_dir: Path, tmp_path: Path) -> None:
    hub = FakeHub()
    hub.add_repo(REPO, tiny_model_dir)
    hub.add_repo("helexa/gguf", tiny_model_dir)
    with serve_in_thread(hub):
        online = fetch(hub, tmp_path)
        online_file = download.fetch_file(
            "helexa/gguf", WEIGHTS, revision=None, cache_dir=tmp_path, report=Recorder(), endpoint=hub.url
        )
    # The hub is gone (connection refused): the cache answers.
    recorder = Recorder()
    assert fetch(hub, tmp_path, report=recorder) == online
    assert recorder.progress[-1].fraction == 1.0
    again = download.fetch_file(
        "helexa/gguf", WEIGHTS, revision=None, cache_dir=tmp_path, report=Recorder(), endpoint=hub.url
    )
    assert again == online_file

    with pytest.raises(TransientLoadError, match="helexa/never"):
        fetch(hub, tmp_path, repo="helexa/never")
    # A snapshot missing a file is not passed off as complete.
    (online / "config.json").unlink()
    with pytest.raises(TransientLoadError, match=f"{REPO} is not complete in the cache"):
        fetch(hub, tmp_path)


# -- one file ---------------------------------------------------------------------------------------------


def test_one_file_of_a_repo_downloads_into_the_cache(hub: FakeHub, tmp_path: Path) -> None:
    directory = write_repo(tmp_path / "repo", weights=os.urandom(10_000))
    gguf = os.urandom(200_000)
    (directory / "tiny-q4_k_m.gguf").write_bytes(gguf)
    repo = hub.add_repo(REPO, directory)
    recorder = Recorder()
    path = download.fetch_file(
        REPO, "tiny-q4_k_m.gguf", revision=None, cache_dir=tmp_path, report=recorder, endpoint=hub.url
    )
    assert path.read_bytes() == gguf
    assert path.parent.name == repo.sha()
    assert [r.path.rsplit("/", 1)[-1] for r in hub.seen("GET", "/resolve/")] == ["tiny-q4_k_m.gguf"]
    assert recorder.progress[-1].done_bytes == recorder.progress[-1].total_bytes == len(gguf)

    with pytest.raises(ModelSourceError, match=r"has no file nope\.gguf"):
        download.fetch_file(
            REPO, "nope.gguf", revision=None, cache_dir=tmp_path, report=Recorder(), endpoint=hub.url
        )
