"""The MLC-LLM engine: each model runs in a worker process the agent supervises.

MLC's maintainers advise one engine per process, and the only reliable way to free its GPU memory is
to end the process, so `MLCEngine.load` starts `python -m helexa.engine.mlc_engine` (or a test's worker
module) and talks to it in JSON lines over its stdin/stdout:

    parent -> worker   {"op": "load", "model", "device", "mode", "tensor_parallel_shards", "model_lib"}
                       {"op": "generate", "id", "prompt" | "messages", "sampling": {...}}
                       {"op": "abort", "id"}   {"op": "shutdown"}
    worker -> parent   {"ev": "progress", "phase", "fraction"}
                       {"ev": "loaded", "memory_mb": {device: MB}, "context_length"}
                       {"ev": "load_error", "kind": "source"|"memory"|"load", "message"}
                       {"ev": "delta", "id", "text"}   {"ev": "aborted", "id"}
                       {"ev": "final", "id", "prompt_tokens", "completion_tokens", "finish_reason"}
                       {"ev": "error", "id", "kind": "request"|"context"|"engine", "message", "param"}

The worker moves its stdout file descriptor aside for the protocol and points fd 1 at stderr, so
native libraries printing to stdout cannot corrupt the stream. If the worker dies, every open request
gets `EngineFault` and the model reports itself failed; the agent itself is untouched.

The real backend uses MLC's documented Python API: `mlc_llm.AsyncMLCEngine(model, device="cuda:N",
mode=..., engine_config=EngineConfig(tensor_parallel_shards=N))`, `engine.chat.completions.create(...,
stream=True)` / `engine.completions.create(...)`, and `engine.terminate()`. Closing MLC's stream aborts
the request inside MLC. MLC's OpenAI API has no `top_k`; it is ignored by this engine.

Not exercised here (no GPU, mlc_llm not installable): the `_MLCBackend` class. The supervision and
protocol are tested with a fake worker module.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import sys
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

import orjson
import pynvml

from .base import (
    Delta,
    EngineName,
    Final,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    LoadProgress,
    LoadSpec,
    MemoryReport,
    ModelId,
    ProgressCallback,
    RequestId,
    TokenLogprob,
    Usage,
)
from .errors import (
    ContextLengthExceeded,
    EngineError,
    EngineFault,
    InsufficientMemory,
    LoadError,
    ModelSourceError,
    RequestError,
)
from .probe import mlc_available
from .streaming import EventChannel, InFlight, check_input, check_usable

log = logging.getLogger(__name__)

WORKER_MODULE = "helexa.engine.mlc_engine"
# How long a worker gets to exit after "shutdown" before it is killed (MLC's terminate joins threads).
SHUTDOWN_GRACE_S = 10.0
# Protocol lines carry small deltas, but a load error may carry a long traceback.
_LINE_LIMIT_BYTES = 16 * 2**20
_LOAD_ERRORS: Mapping[str, type[LoadError]] = {
    "source": ModelSourceError,
    "memory": InsufficientMemory,
    "load": LoadError,
}


class MLCEngine:
    """Runs each model in a supervised worker process. Implements `Engine`.

    `worker_module` is the module run as `python -m`; tests pass a fake one. `require_mlc=False`
    skips the "is mlc_llm installed" check (for fake workers).
    """

    def __init__(
        self,
        *,
        worker_module: str = WORKER_MODULE,
        python: str = sys.executable,
        require_mlc: bool = True,
        mode: str = "server",
    ) -> None:
        self._worker_module = worker_module
        self._python = python
        self._require_mlc = require_mlc
        self._mode = mode

    @property
    def name(self) -> EngineName:
        return "mlc"

    async def load(self, spec: LoadSpec, progress: ProgressCallback | None = None) -> MLCModel:
        if self._require_mlc and not mlc_available():
            raise LoadError(
                "the mlc engine needs the mlc_llm package, which is not installed on this host "
                '(install MLC-LLM\'s CUDA wheel, or set engine = "transformers" for this model)'
            )
        cpu = tuple(spec.devices) == ("cpu",)
        if not cpu and (not spec.devices or not all(d.startswith("cuda:") for d in spec.devices)):
            raise LoadError(
                f"the mlc engine needs explicit CUDA devices (cuda:N) or cpu, got {list(spec.devices)}"
            )
        if progress is not None:
            progress(LoadProgress(phase="resolving"))
        env = dict(os.environ)
        if not cpu:
            # Tensor parallel: the worker sees exactly the devices it was given, as cuda:0..N-1.
            env["CUDA_VISIBLE_DEVICES"] = ",".join(d.split(":", 1)[1] for d in spec.devices)
        if spec.cache_dir is not None:
            env["MLC_LLM_HOME"] = str(spec.cache_dir)
        process = await asyncio.create_subprocess_exec(
            self._python,
            "-m",
            self._worker_module,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            limit=_LINE_LIMIT_BYTES,
        )
        model = MLCModel(spec=spec, process=process)
        try:
            await model._start(
                {
                    "op": "load",
                    "model": spec.source,
                    "device": "cpu" if cpu else "cuda:0",
                    "devices": list(spec.devices),
                    "mode": self._mode,
                    "tensor_parallel_shards": len(spec.devices),
                    "memory_mb": spec.memory_mb,
                    "model_lib": spec.options.get("model_lib"),
                    "context_length": spec.context_length,
                    "options": {k: v for k, v in spec.options.items() if k != "model_lib"},
                },
                progress,
            )
        except BaseException:
            await model._kill()
            raise
        return model


class MLCModel:
    """A model served by a worker process. Implements `LoadedModel`."""

    def __init__(self, *, spec: LoadSpec, process: asyncio.subprocess.Process) -> None:
        self._model_id = spec.model_id
        self._devices = spec.devices
        self._process = process
        self._memory = MemoryReport(per_device_mb=dict.fromkeys(spec.devices, 0))
        self._context_length = spec.context_length or 0
        self._streams: dict[str, _WorkerStream] = {}
        self._in_flight: InFlight[str] = InFlight()  # wire ids by request id
        self._ids = itertools.count()
        self._fault: str | None = None
        self._closing = False
        self._reader: asyncio.Task[None] | None = None
        self._load_result: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._progress: ProgressCallback | None = None

    @property
    def model_id(self) -> ModelId:
        return self._model_id

    @property
    def memory(self) -> MemoryReport:
        return self._memory

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def waiting(self) -> int:
        return 0  # MLC's own scheduler queues inside the worker; it does not say how many

    @property
    def fault(self) -> str | None:
        return self._fault

    @property
    def pid(self) -> int:
        return self._process.pid

    async def _start(self, load_message: dict[str, Any], progress: ProgressCallback | None) -> None:
        self._progress = progress
        self._reader = asyncio.create_task(self._read(), name=f"mlc-worker:{self._model_id}")
        await self._send(load_message)
        result = await self._load_result
        self._progress = None
        memory = result.get("memory_mb") or {}
        # The worker numbers its visible devices from 0; report them under the agent's names.
        per_device = {
            name: int(memory.get(f"cuda:{i}", memory.get(name, 0))) for i, name in enumerate(self._devices)
        }
        self._memory = MemoryReport(per_device_mb=per_device)
        self._context_length = int(result.get("context_length") or self._context_length or 4096)
        log.info("mlc worker %d serves %s (%s)", self._process.pid, self._model_id, per_device)

    async def _send(self, message: Mapping[str, Any]) -> None:
        stdin = self._process.stdin
        if stdin is None or stdin.is_closing():
            raise EngineFault(f"mlc worker for {self._model_id} is gone")
        stdin.write(orjson.dumps(message) + b"\n")
        try:
            await stdin.drain()
        except (ConnectionError, BrokenPipeError) as exc:
            raise EngineFault(f"mlc worker for {self._model_id} is gone: {exc}") from exc

    async def _read(self) -> None:
        """Dispatch worker events until its stdout closes; then fail whatever is still open."""
        stdout = self._process.stdout
        assert stdout is not None
        try:
            while line := await stdout.readline():
                try:
                    event = orjson.loads(line)
                except orjson.JSONDecodeError:
                    log.warning("mlc worker %d wrote a non-protocol line: %r", self._process.pid, line[:200])
                    continue
                self._dispatch(event)
        finally:
            code = await self._process.wait()
            reason = f"mlc worker exited with code {code}"
            if not self._load_result.done():
                self._load_result.set_exception(LoadError(f"{reason} while loading {self._model_id}"))
            if not self._closing:
                self._fault = reason
                log.error("model %s failed: %s", self._model_id, reason)
            for stream in self._streams.values():
                stream.channel.put(EngineFault(f"model {self._model_id} failed: {reason}"))

    def _dispatch(self, event: dict[str, Any]) -> None:
        kind = event.get("ev")
        if kind == "progress":
            if self._progress is not None:
                self._progress(
                    LoadProgress(phase=event.get("phase", "loading"), fraction=event.get("fraction"))
                )
        elif kind == "loaded":
            if not self._load_result.done():
                self._load_result.set_result(event)
        elif kind == "load_error":
            if not self._load_result.done():
                error = _LOAD_ERRORS.get(str(event.get("kind")), LoadError)
                self._load_result.set_exception(error(str(event.get("message"))))
        elif (stream := self._streams.get(str(event.get("id")))) is not None:
            stream.on_event(event)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        check_usable(self._model_id, fault=self._fault, unloaded=self._closing)
        check_input(request)
        if request.tools and request.tool_choice != "none":
            raise RequestError("tool calling is not available on the mlc engine yet", param="tools")
        if request.response_format is not None:
            raise RequestError(
                "structured output is not available on the mlc engine yet", param="response_format"
            )
        s = request.sampling
        wire_id = f"{request.request_id}#{next(self._ids)}"
        message: dict[str, Any] = {
            "op": "generate",
            "id": wire_id,
            "sampling": {
                "temperature": s.temperature,
                "top_p": s.top_p,
                "top_k": s.top_k,
                "seed": s.seed,
                "max_tokens": s.max_tokens,
                "stop": list(s.stop),
                "presence_penalty": s.presence_penalty,
                "frequency_penalty": s.frequency_penalty,
                "logit_bias": {str(t): b for t, b in s.logit_bias},
            },
            "logprobs": request.logprobs,
        }
        if request.messages is not None:
            message["messages"] = [
                {"role": "system" if m.role == "developer" else m.role, "content": m.content}
                for m in request.messages
            ]
        else:
            message["prompt"] = request.prompt
        stream = self._streams[wire_id] = _WorkerStream()
        self._in_flight.add(request.request_id, wire_id)
        try:
            await self._send(message)
            async for event in stream.channel:
                yield event
        finally:
            self._streams.pop(wire_id, None)
            self._in_flight.discard(request.request_id, wire_id)
            if not stream.channel.finished and self._fault is None and not self._closing:
                with contextlib.suppress(EngineError):
                    await self._send({"op": "abort", "id": wire_id})

    async def abort(self, request_id: RequestId) -> None:
        for wire_id in self._in_flight.of(request_id):
            with contextlib.suppress(EngineError):
                await self._send({"op": "abort", "id": wire_id})

    async def unload(self) -> None:
        if self._closing:
            await self._process.wait()
            return
        self._closing = True
        with contextlib.suppress(EngineError):
            await self._send({"op": "shutdown"})
        try:
            await asyncio.wait_for(self._process.wait(), SHUTDOWN_GRACE_S)
        except TimeoutError:
            log.warning("mlc worker %d ignored shutdown; killing it", self._process.pid)
            await self._kill()
        if self._reader is not None:
            await self._reader
        log.info("unloaded %s (worker %d exited)", self._model_id, self._process.pid)

    async def _kill(self) -> None:
        self._closing = True
        if self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
            await self._process.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, LoadError):
                await self._reader


class _WorkerStream:
    """One generation as the worker reports it, turned into engine events on an `EventChannel`."""

    __slots__ = ("_deltas", "channel")

    def __init__(self) -> None:
        self.channel = EventChannel()
        self._deltas = 0  # the completion's token count when the worker reports none

    def on_event(self, event: Mapping[str, Any]) -> None:
        kind = event.get("ev")
        if kind == "delta":
            self._deltas += 1
            if text := str(event.get("text") or ""):
                self.channel.put(Delta(text=text, logprobs=_logprobs(event.get("logprobs"))))
        elif kind == "final":
            usage = Usage(
                prompt_tokens=int(event.get("prompt_tokens") or 0),
                completion_tokens=int(event.get("completion_tokens") or self._deltas),
            )
            finish: FinishReason = "length" if event.get("finish_reason") == "length" else "stop"
            self.channel.put(Final(usage=usage, finish_reason=finish))
        elif kind == "aborted":
            self.channel.put(
                Final(usage=Usage(prompt_tokens=0, completion_tokens=self._deltas), finish_reason="stop")
            )
        elif kind == "error":
            self.channel.put(_request_error(event))


def _logprobs(value: object) -> tuple[TokenLogprob, ...]:
    """The worker's `[{token, logprob, top: [[token, logprob], ...]}]` (MLC reports no token ids: -1)."""
    if not isinstance(value, list):
        return ()
    out = []
    for item in value:
        if not isinstance(item, dict):
            continue
        top = tuple(
            (-1, str(t[0]), float(t[1])) for t in item.get("top") or () if isinstance(t, list) and len(t) == 2
        )
        out.append(
            TokenLogprob(
                token_id=-1, text=str(item.get("token", "")), logprob=float(item.get("logprob", 0.0)), top=top
            )
        )
    return tuple(out)


def _request_error(event: Mapping[str, Any]) -> EngineError:
    message = str(event.get("message") or "request failed")
    param = event.get("param")
    kind = event.get("kind")
    if kind == "context":
        return ContextLengthExceeded(message, param=str(param) if param else "messages")
    if kind == "request":
        return RequestError(message, param=str(param) if param else None)
    return EngineError(message)


# -- the worker side ---------------------------------------------------------------------------------


class WorkerBackend(Protocol):
    """What a worker process serves; `_MLCBackend` is the real one, tests provide fakes."""

    async def load(self, message: Mapping[str, Any], report: Any) -> dict[str, Any]:
        """Load the model; return {"memory_mb": {...}, "context_length": N}."""
        ...

    def generate(self, message: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Yield {"ev": "delta", "text"} events and one {"ev": "final", ...} event (ids are added)."""
        ...

    async def terminate(self) -> None: ...


class WorkerRequestError(Exception):
    """Raised by a backend for a bad request (kind "request" or "context")."""

    def __init__(self, message: str, *, kind: str = "request", param: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.param = param


def serve(backend: WorkerBackend) -> None:
    """Run the worker protocol on this process's stdin/stdout until shutdown or the parent leaves."""
    protocol_fd = os.dup(1)
    os.dup2(2, 1)  # anything printed to stdout from now on lands in stderr
    out = os.fdopen(protocol_fd, "wb", buffering=0)

    def write(event: Mapping[str, Any]) -> None:
        out.write(orjson.dumps(event) + b"\n")

    asyncio.run(_serve(backend, write))


async def _serve(backend: WorkerBackend, write: Any) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=_LINE_LIMIT_BYTES)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    first = await reader.readline()
    if not first:
        return
    load = orjson.loads(first)
    try:
        info = await backend.load(
            load, lambda phase, fraction=None: write({"ev": "progress", "phase": phase, "fraction": fraction})
        )
    except Exception as exc:
        kind = getattr(exc, "kind", None) or ("memory" if "out of memory" in str(exc).lower() else "load")
        write({"ev": "load_error", "kind": kind, "message": f"{type(exc).__name__}: {exc}"})
        return
    write({"ev": "loaded", **info})
    tasks: dict[str, asyncio.Task[None]] = {}

    async def run(wire_id: str, message: Mapping[str, Any]) -> None:
        try:
            async for event in backend.generate(message):
                write({**event, "id": wire_id})
        except asyncio.CancelledError:
            write({"ev": "aborted", "id": wire_id})
            raise
        except WorkerRequestError as exc:
            write({"ev": "error", "id": wire_id, "kind": exc.kind, "message": str(exc), "param": exc.param})
        except Exception as exc:
            write({"ev": "error", "id": wire_id, "kind": "engine", "message": f"{type(exc).__name__}: {exc}"})
        finally:
            tasks.pop(wire_id, None)

    while line := await reader.readline():
        message = orjson.loads(line)
        op = message.get("op")
        if op == "generate":
            wire_id = str(message["id"])
            tasks[wire_id] = asyncio.create_task(run(wire_id, message))
        elif op == "abort":
            task = tasks.get(str(message.get("id")))
            if task is not None:
                task.cancel()
        elif op == "shutdown":
            break
    for task in list(tasks.values()):
        task.cancel()
    await asyncio.gather(*tasks.values(), return_exceptions=True)
    await backend.terminate()


class _MLCBackend:
    """The real backend over `mlc_llm.AsyncMLCEngine`. Not run by the test suite (no GPU here)."""

    def __init__(self) -> None:
        self._engine: Any = None

    async def load(self, message: Mapping[str, Any], report: Any) -> dict[str, Any]:
        # Lazy: mlc_llm (TVM, CUDA) exists only on CUDA hosts, and only the worker process imports it.
        from mlc_llm import AsyncMLCEngine  # noqa: PLC0415
        from mlc_llm.serve.config import EngineConfig  # noqa: PLC0415

        report("loading")
        config = EngineConfig(tensor_parallel_shards=int(message.get("tensor_parallel_shards") or 1))
        kwargs: dict[str, Any] = {
            "device": message["device"],
            "mode": message["mode"],
            "engine_config": config,
        }
        if message.get("model_lib"):
            kwargs["model_lib"] = message["model_lib"]
        # Constructing the engine downloads (HF://), JIT-compiles if needed and allocates the KV cache.
        self._engine = await asyncio.to_thread(AsyncMLCEngine, message["model"], **kwargs)
        report("warming")
        context = getattr(self._engine, "max_input_sequence_length", None) or message.get("context_length")
        memory = _gpu_memory_of_this_process(len(message.get("devices") or [0]))
        if not any(memory.values()) and message.get("memory_mb"):
            # NVML cannot tell (a container without process accounting, the cpu device): report the
            # catalogue's figure, which MLC's own KV sizing was asked to stay within.
            devices = list(message.get("devices") or ["cpu"])
            memory = {d: int(message["memory_mb"]) // len(devices) for d in devices}
        return {"memory_mb": memory, "context_length": context}

    async def generate(self, message: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        s = message["sampling"]
        common: dict[str, Any] = {
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": s["temperature"],
            "top_p": s["top_p"],
            "seed": s["seed"],
            "max_tokens": s["max_tokens"],
            "stop": s["stop"] or None,
            "presence_penalty": s.get("presence_penalty") or 0.0,
            "frequency_penalty": s.get("frequency_penalty") or 0.0,
        }
        if s.get("logit_bias"):
            common["logit_bias"] = s["logit_bias"]
        chat = "messages" in message
        top = message.get("logprobs")
        if top is not None:
            # Chat takes `logprobs: true` + `top_logprobs: k`; completions `logprobs: k`.
            common.update({"logprobs": True, "top_logprobs": top} if chat else {"logprobs": top})
        finish = "stop"
        usage: Any = None
        try:
            if chat:
                stream = await self._engine.chat.completions.create(messages=message["messages"], **common)
            else:
                stream = await self._engine.completions.create(prompt=message["prompt"], **common)
            # MLC raises BadRequestError (a prompt over the context, ...) while the stream is iterated,
            # not only when it is created: both are the client's errors.
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    delta = getattr(choice, "delta", None)
                    piece = delta.content if delta is not None else getattr(choice, "text", None)
                    if piece:
                        event: dict[str, Any] = {"ev": "delta", "text": piece}
                        if top is not None:
                            event["logprobs"] = _mlc_logprobs(getattr(choice, "logprobs", None))
                        yield event
                    if choice.finish_reason is not None:
                        finish = "length" if choice.finish_reason == "length" else "stop"
        except Exception as exc:
            if type(exc).__name__ == "BadRequestError":
                text = str(exc)
                kind = "context" if "length" in text.lower() else "request"
                raise WorkerRequestError(text, kind=kind, param=None if chat else "prompt") from exc
            raise
        yield {
            "ev": "final",
            "finish_reason": finish,
            "prompt_tokens": getattr(usage, "prompt_tokens", 0),
            "completion_tokens": getattr(usage, "completion_tokens", 0),
        }

    async def terminate(self) -> None:
        if self._engine is not None:
            await asyncio.to_thread(self._engine.terminate)
            self._engine = None


def _mlc_logprobs(value: Any) -> list[dict[str, Any]]:
    """MLC's chat (`content: [{token, logprob, top_logprobs}]`) or completion logprobs as wire items."""
    if value is None:
        return []
    content = getattr(value, "content", None)
    if content is not None:
        return [
            {
                "token": item.token,
                "logprob": item.logprob,
                "top": [[t.token, t.logprob] for t in (getattr(item, "top_logprobs", None) or ())],
            }
            for item in content
        ]
    tokens = getattr(value, "tokens", None) or []
    values = getattr(value, "token_logprobs", None) or []
    return [{"token": t, "logprob": v, "top": []} for t, v in zip(tokens, values, strict=False)]


def _gpu_memory_of_this_process(n_devices: int) -> dict[str, int]:
    """GPU memory this worker holds per visible device, from NVML (0 when NVML cannot tell)."""
    result = {f"cuda:{i}": 0 for i in range(n_devices)}
    try:
        pynvml.nvmlInit()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        indices = [int(x) for x in visible.split(",") if x.strip().isdigit()] or list(range(n_devices))
        for i, index in enumerate(indices[:n_devices]):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == os.getpid() and proc.usedGpuMemory:
                    result[f"cuda:{i}"] = int(proc.usedGpuMemory) // 2**20
    except Exception as exc:  # NVML missing or restricted: memory stays unknown (0)
        log.debug("NVML memory query failed: %s", exc)
    return result


if __name__ == "__main__":
    serve(_MLCBackend())
