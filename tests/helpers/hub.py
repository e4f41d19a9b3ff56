"""A fake Hugging Face hub: the endpoints `huggingface_hub` downloads through, served by aiohttp on
127.0.0.1 (port 0), so download tests run with no network (point `HF_ENDPOINT` or `endpoint=` at `url`).

What it answers, as the real hub does (see huggingface_hub's `hf_api.model_info`, `list_repo_tree` and
`file_download.get_hf_file_metadata`):

- `GET /api/models/{org}/{name}[/revision/{rev}]`: the commit sha and the files (`siblings`);
- `GET /api/models/{org}/{name}/tree/{rev}[/{path}]`: the files with size, git oid and LFS sha256;
- `HEAD|GET /{org}/{name}/resolve/{rev}/{path}`: the file, with `X-Repo-Commit`, `ETag` (the git blob
  oid; LFS files add `X-Linked-Etag`/`X-Linked-Size` with their sha256) and `Range` support (206). No
  Xet headers are ever sent, so `huggingface_hub` downloads over plain HTTP even with hf_xet installed.

Errors carry the hub's `X-Error-Code` (`RepoNotFound` 404, `RevisionNotFound` 404, `EntryNotFound` 404,
`GatedRepo` 401), which huggingface_hub turns into its typed errors. Per repo: several revisions with
different files, gated (401 for everything unless the request bears the repo's token), a throttle in
bytes per second (a slow server, for progress), HEADs that do not say the size, and `break_file`: one
GET of a file drops the connection after N bytes (then optionally answers the next GET of it with an
error status once).

Use it in-process on the test's loop (`await hub.start()` / `await hub.close()`), on a thread of its own
(`with serve_in_thread(hub):`, for tests that call blocking download code), or as a process:
`python -m tests.helpers.hub org/name=DIR [--gated TOKEN] [--bytes-per-s N]` prints its URL and serves
until it is terminated. Every request is recorded in `hub.requests`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import re
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

__all__ = ["FakeHub", "FakeRepo", "HubFile", "SeenRequest", "serve_in_thread"]

# Files the hub stores in LFS (their ETag is the sha256, announced by X-Linked-Etag).
LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt")
# Bytes written per throttled write: small enough that a slow download advances many times a second.
_THROTTLE_CHUNK = 8 * 1024


@dataclass(frozen=True, kw_only=True, slots=True)
class HubFile:
    """One file of one commit."""

    path: str
    data: bytes

    @property
    def lfs(self) -> bool:
        return self.path.endswith(LFS_SUFFIXES)

    @property
    def oid(self) -> str:
        """The git blob id (what the hub's ETag is for a regular file)."""
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def etag(self) -> str:
        """The name huggingface_hub gives the file's blob in its cache."""
        return self.sha256 if self.lfs else self.oid


@dataclass(kw_only=True)
class _Break:
    after_bytes: int
    then_status: int | None
    broken: bool = False


@dataclass(kw_only=True)
class FakeRepo:
    """A model repo: `refs` maps branch/tag names to commit shas, `commits` a sha to its files."""

    repo_id: str
    refs: dict[str, str]
    commits: dict[str, dict[str, HubFile]]
    gated: bool = False
    # A gated repo serves requests that bear this token (`Authorization: Bearer <token>`).
    token: str | None = None
    bytes_per_s: float | None = None
    # HEAD answers without the size (no Content-Length, no X-Linked-Size), as some mirrors do.
    head_without_size: bool = False
    breaks: dict[str, _Break] = field(default_factory=dict)

    def sha(self, ref: str = "main") -> str:
        return self.refs[ref]

    def resolve(self, revision: str) -> str | None:
        """The commit a branch, tag or sha names (None: no such revision)."""
        if revision in self.commits:
            return revision
        return self.refs.get(revision)


@dataclass(frozen=True, kw_only=True, slots=True)
class SeenRequest:
    method: str
    path: str
    range: str | None
    authorization: str | None


def _read_tree(directory: Path) -> dict[str, HubFile]:
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    return {
        p.relative_to(directory).as_posix(): HubFile(
            path=p.relative_to(directory).as_posix(), data=p.read_bytes()
        )
        for p in files
    }


def _commit_sha(repo_id: str, ref: str, files: Mapping[str, HubFile]) -> str:
    digest = hashlib.sha1(f"{repo_id}\0{ref}".encode())
    for name, f in sorted(files.items()):
        digest.update(f"{name}\0{f.oid}\0".encode())
    return digest.hexdigest()


def _error(status: int, code: str, message: str, *, commit: str | None = None) -> web.Response:
    headers = {"X-Error-Code": code, "X-Error-Message": message}
    if commit is not None:
        headers["X-Repo-Commit"] = commit
    return web.json_response({"error": message}, status=status, headers=headers)


_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class FakeHub:
    """The fake hub. Configure repos before or while it serves; `url` is set by `start()`."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[SeenRequest] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    # -- configuration ---------------------------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        files: Path | Mapping[str, Path],
        *,
        gated: bool = False,
        token: str | None = None,
        bytes_per_s: float | None = None,
        head_without_size: bool = False,
    ) -> FakeRepo:
        """Serve `files` (a directory, as `main`; or branch/tag name -> directory) as `repo_id`."""
        dirs = {"main": files} if isinstance(files, Path) else dict(files)
        repo = FakeRepo(
            repo_id=repo_id,
            refs={},
            commits={},
            gated=gated,
            token=token,
            bytes_per_s=bytes_per_s,
            head_without_size=head_without_size,
        )
        for ref, directory in dirs.items():
            tree = _read_tree(directory)
            sha = _commit_sha(repo_id, ref, tree)
            repo.refs[ref] = sha
            repo.commits[sha] = tree
        self.repos[repo_id] = repo
        return repo

    def break_file(
        self, repo_id: str, path: str, *, after_bytes: int, then_status: int | None = None
    ) -> None:
        """The next GET of `path` drops the connection after `after_bytes` bytes of the body; with
        `then_status`, the GET after that is answered with that status (once)."""
        self.repos[repo_id].breaks[path] = _Break(after_bytes=after_bytes, then_status=then_status)

    def seen(self, method: str, path_contains: str = "") -> list[SeenRequest]:
        return [r for r in self.requests if r.method == method and path_contains in r.path]

    # -- lifecycle -------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/api/models/{org}/{name}", self._info)
        app.router.add_get("/api/models/{org}/{name}/revision/{rev}", self._info)
        app.router.add_get("/api/models/{org}/{name}/tree/{rev}", self._tree)
        app.router.add_get("/api/models/{org}/{name}/tree/{rev}/{path:.*}", self._tree)
        # add_get registers HEAD too.
        app.router.add_get("/{org}/{name}/resolve/{rev}/{path:.+}", self._resolve)
        return app

    async def start(self) -> None:
        """Listen on 127.0.0.1 (a free port) on the running loop."""
        runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._runner = runner
        host, port = runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- handlers --------------------------------------------------------------------------------------

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append(
            SeenRequest(
                method=request.method,
                path=request.path,
                range=request.headers.get("Range"),
                authorization=request.headers.get("Authorization"),
            )
        )
        response: web.StreamResponse = await handler(request)
        return response

    def _repo(self, request: web.Request) -> FakeRepo | web.Response:
        repo_id = f"{request.match_info['org']}/{request.match_info['name']}"
        repo = self.repos.get(repo_id)
        if repo is None:
            return _error(404, "RepoNotFound", "Repository not found")
        if repo.gated and request.headers.get("Authorization") != f"Bearer {repo.token}":
            return _error(
                401,
                "GatedRepo",
                f"Access to model {repo_id} is restricted. You must have access to it and be authenticated"
                " to access it. Please log in.",
            )
        return repo

    def _commit(self, request: web.Request) -> tuple[FakeRepo, str] | web.Response:
        repo = self._repo(request)
        if isinstance(repo, web.Response):
            return repo
        sha = repo.resolve(request.match_info.get("rev", "main"))
        if sha is None:
            return _error(404, "RevisionNotFound", "Invalid rev id")
        return repo, sha

    async def _info(self, request: web.Request) -> web.Response:
        found = self._commit(request)
        if isinstance(found, web.Response):
            return found
        repo, sha = found
        blobs = request.query.get("blobs", "").lower() == "true"
        siblings: list[dict[str, Any]] = []
        for f in repo.commits[sha].values():
            sibling: dict[str, Any] = {"rfilename": f.path}
            if blobs:
                sibling |= {"size": len(f.data), "blobId": f.oid}
                if f.lfs:
                    sibling["lfs"] = {"sha256": f.sha256, "size": len(f.data), "pointerSize": 134}
            siblings.append(sibling)
        return web.json_response(
            {
                "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "sha": sha,
                "private": False,
                "gated": "auto" if repo.gated else False,
                "disabled": False,
                "tags": [],
                "siblings": siblings,
            }
        )

    async def _tree(self, request: web.Request) -> web.Response:
        found = self._commit(request)
        if isinstance(found, web.Response):
            return found
        repo, sha = found
        prefix = request.match_info.get("path", "").strip("/")
        entries: list[dict[str, Any]] = []
        for f in repo.commits[sha].values():
            if prefix and not f.path.startswith(prefix + "/"):
                continue
            entry: dict[str, Any] = {"type": "file", "oid": f.oid, "size": len(f.data), "path": f.path}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": 134}
            entries.append(entry)
        return web.json_response(entries)

    async def _resolve(self, request: web.Request) -> web.StreamResponse:
        found = self._commit(request)
        if isinstance(found, web.Response):
            return found
        repo, sha = found
        path = request.match_info["path"]
        hub_file = repo.commits[sha].get(path)
        if hub_file is None:
            return _error(404, "EntryNotFound", f"{path} does not exist on this revision", commit=sha)
        data = hub_file.data
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{hub_file.oid}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if hub_file.lfs:
            headers |= {"X-Linked-Etag": f'"{hub_file.sha256}"', "X-Linked-Size": str(len(data))}
        if request.method == "HEAD":
            if repo.head_without_size:
                headers.pop("X-Linked-Size", None)
                return web.Response(headers=headers)
            response = web.StreamResponse(headers=headers)
            response.content_length = len(data)
            await response.prepare(request)
            return response

        broken = repo.breaks.get(path)
        if broken is not None and broken.broken and broken.then_status is not None:
            status, broken.then_status = broken.then_status, None
            return web.Response(status=status, text="the hub is having a bad moment")

        start, status = 0, 200
        match = _RANGE.match(request.headers.get("Range", ""))
        if match is not None and int(match.group(1)) < len(data):
            start, status = int(match.group(1)), 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = len(data) - start
        await response.prepare(request)
        stop = len(data)
        cut = broken is not None and not broken.broken
        if cut and broken is not None:
            stop = min(stop, start + broken.after_bytes)
        await self._send(response, data[start:stop], repo.bytes_per_s)
        if cut and broken is not None:
            broken.broken = True
            # Drop the connection mid-body: the client sees fewer bytes than Content-Length announced.
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        return response

    @staticmethod
    async def _send(response: web.StreamResponse, body: bytes, bytes_per_s: float | None) -> None:
        if bytes_per_s is None:
            await response.write(body)
            return
        began = time.monotonic()
        for offset in range(0, len(body), _THROTTLE_CHUNK):
            chunk = body[offset : offset + _THROTTLE_CHUNK]
            await response.write(chunk)
            # Pace by the total sent so far, so scheduling jitter does not add up.
            ahead = (offset + len(chunk)) / bytes_per_s - (time.monotonic() - began)
            if ahead > 0:
                await asyncio.sleep(ahead)


@contextlib.contextmanager
def serve_in_thread(hub: FakeHub) -> Iterator[FakeHub]:
    """Run `hub` on an event loop of its own in a daemon thread while the block runs, so that blocking
    code (a download in the test's thread) can talk to it."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fake-hub", daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(hub.start(), loop).result(timeout=10)
        try:
            yield hub
        finally:
            asyncio.run_coroutine_threadsafe(hub.close(), loop).result(timeout=10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def main(argv: list[str] | None = None) -> None:
    """Serve repos from directories until SIGTERM or SIGINT; the first line printed is the URL."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "repos", nargs="+", metavar="ORG/NAME=DIR", help="a repo id and the directory it serves"
    )
    parser.add_argument("--gated", metavar="TOKEN", help="every repo is gated; this token opens it")
    parser.add_argument("--bytes-per-s", type=float, help="throttle every file body to this rate")
    args = parser.parse_args(argv)
    hub = FakeHub()
    for spec in args.repos:
        repo_id, _, directory = spec.partition("=")
        hub.add_repo(
            repo_id,
            Path(directory),
            gated=args.gated is not None,
            token=args.gated,
            bytes_per_s=args.bytes_per_s,
        )

    async def serve() -> None:
        await hub.start()
        print(hub.url, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await hub.close()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
