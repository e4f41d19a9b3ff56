"""The Anthropic Messages API wire format: request parsing to engine types, response and event builders.

    parse_messages_request(body)      POST /v1/messages              → MessagesRequest (400 naming the field)
    parse_count_tokens_request(body)  POST /v1/messages/count_tokens → MessagesRequest (no max_tokens)
    message_json(...), event(...)     the Message object and the named SSE events of a stream
    error_envelope(err)               {"type": "error", "error": {"type", "message"}}

Content blocks map onto the engine's chat messages: `system` (a string or text blocks) becomes a system
message; a user turn's `tool_result` blocks become `tool` messages (answering the calls of the turn
before), its text blocks one user message; an assistant turn's text and `tool_use` blocks become one
assistant message with its tool calls. `tool_choice` `auto`/`any`/`tool`/`none` becomes the engine's
"auto"/"required"/the tool's name/"none"; `disable_parallel_tool_use` its `parallel_tool_calls`.

`max_tokens` is a cap here, as Anthropic means it (clients send 32000 to any model): one larger than the
model's context becomes "until the context is full". `stop_sequences` are matched by the edge, not the
engine, so that `stop_reason` can say `stop_sequence` and name the one that matched.
"""

from __future__ import annotations

import dataclasses
import datetime
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson

from helexa.engine.base import ChatMessage, ToolCall, ToolSpec, Usage
from helexa.mesh.errors import HelexaError, InvalidRequest
from helexa.mesh.routing.decisions import ModelListing
from helexa.mesh.routing.peer_client import FORWARD_PREFIX
from helexa.mesh.server.openai_wire import SamplingOverrides, unsupported
from helexa.mesh.server.openai_wire import decode_body as _decode
from helexa.mesh.server.openai_wire import integer_field as _integer
from helexa.mesh.server.openai_wire import invalid_type as _invalid
from helexa.mesh.server.openai_wire import number_field as _number

__all__ = [
    "MESSAGES_PATH",
    "MessagesRequest",
    "StopReason",
    "capped",
    "content_block_start",
    "content_block_stop",
    "count_tokens_json",
    "error_body",
    "error_envelope",
    "error_event",
    "event",
    "input_json_delta",
    "is_anthropic_path",
    "message_delta",
    "message_json",
    "message_start",
    "message_stop",
    "model_json",
    "model_list_json",
    "model_object",
    "new_message_id",
    "new_tool_use_id",
    "parse_count_tokens_request",
    "parse_messages_request",
    "ping",
    "text_block",
    "text_delta",
    "tool_input",
    "tool_use_block",
]

MESSAGES_PATH: Final = "/v1/messages"
MAX_STOP_SEQUENCES: Final = 16
MAX_TOOLS: Final = 128
MAX_SCHEMA_BYTES: Final = 64 * 1024
MAX_TOKENS_LIMIT: Final = 2**31 - 1

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


@dataclass(frozen=True, kw_only=True, slots=True)
class MessagesRequest:
    model: str
    messages: tuple[ChatMessage, ...]
    sampling: SamplingOverrides  # `stop` is always None: `stop_sequences` are matched by the edge
    stop_sequences: tuple[str, ...] = ()
    stream: bool = False
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: str = "none"
    parallel_tool_calls: bool = True

    @property
    def parses_calls(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"


def capped(sampling: SamplingOverrides, context_length: int | None) -> SamplingOverrides:
    """`max_tokens` as a cap: one beyond the context means "until the context is full" (None)."""
    if context_length and sampling.max_tokens is not None and sampling.max_tokens > context_length:
        return dataclasses.replace(sampling, max_tokens=None)
    return sampling


# --------------------------------------------------------------------------------------------------
# Errors


def is_anthropic_path(path: str) -> bool:
    """Whether `path` is one of this API's routes (directly, or forwarded by a peer)."""
    if path.startswith(FORWARD_PREFIX + "/"):
        path = path[len(FORWARD_PREFIX) :]
    return path == MESSAGES_PATH or path.startswith(MESSAGES_PATH + "/")


_ERROR_TYPES: Final[dict[int, str]] = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def error_envelope(err: HelexaError, *, with_code: bool = False) -> dict[str, Any]:
    """Anthropic's error body. `with_code` adds helexa's code (a peer's answer to the entry agent,
    whose forwarder reads it to tell a refusal it may retry elsewhere)."""
    default = "invalid_request_error" if err.status < 500 else "api_error"
    inner: dict[str, Any] = {"type": _ERROR_TYPES.get(err.status, default), "message": err.message}
    if with_code and err.code is not None:
        inner["code"] = err.code
    return {"type": "error", "error": inner}


def error_body(err: HelexaError, path: str = "") -> bytes:
    return orjson.dumps(error_envelope(err, with_code=path.startswith(FORWARD_PREFIX + "/")))


def error_event(err: HelexaError) -> bytes:
    """The last frame of a stream that failed after it started (the SDK raises on it)."""
    return event("error", error_envelope(err))


# --------------------------------------------------------------------------------------------------
# Parsing


def _model(data: Mapping[str, Any]) -> str:
    value = data.get("model")
    if value is None:
        raise InvalidRequest("model: Field required", param="model")
    if not isinstance(value, str):
        raise _invalid("model", "a string", value)
    if not value.strip():
        raise InvalidRequest("model: must not be empty", param="model")
    return value


def _text_blocks(value: object, param: str) -> str:
    """A string, or a list of text blocks, as one text."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _invalid(param, "a string or an array of text blocks", value)
    parts: list[str] = []
    for j, block in enumerate(value):
        where = f"{param}.{j}"
        if not isinstance(block, dict):
            raise _invalid(where, "an object", block)
        if block.get("type") != "text":
            raise unsupported(f"{where}.type", f"a block of type {str(block.get('type'))[:40]!r} here")
        text = block.get("text")
        if not isinstance(text, str):
            raise _invalid(f"{where}.text", "a string", text)
        parts.append(text)
    return "\n".join(parts)


def _system(data: Mapping[str, Any]) -> tuple[ChatMessage, ...]:
    value = data.get("system")
    if value is None:
        return ()
    text = _text_blocks(value, "system")
    return (ChatMessage(role="system", content=text),) if text else ()


def _tool_use(block: Mapping[str, Any], where: str) -> ToolCall:
    call_id, name, arguments = block.get("id"), block.get("name"), block.get("input", {})
    if not isinstance(call_id, str) or not call_id:
        raise _invalid(f"{where}.id", "a non-empty string", call_id)
    if not isinstance(name, str) or not name:
        raise _invalid(f"{where}.name", "a non-empty string", name)
    if not isinstance(arguments, dict):
        raise _invalid(f"{where}.input", "an object", arguments)
    return ToolCall(id=call_id, name=name, arguments=orjson.dumps(arguments).decode())


def _tool_result(block: Mapping[str, Any], where: str) -> ChatMessage:
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str) or not call_id:
        raise _invalid(f"{where}.tool_use_id", "a non-empty string", call_id)
    content = block.get("content", "")
    text = _text_blocks(content, f"{where}.content")
    if block.get("is_error") is True:
        text = f"Error: {text}"
    return ChatMessage(role="tool", content=text, tool_call_id=call_id)


def _turn(item: object, i: int) -> list[ChatMessage]:
    where = f"messages.{i}"
    if not isinstance(item, dict):
        raise _invalid(where, "an object", item)
    role = item.get("role")
    if role not in ("user", "assistant"):
        raise InvalidRequest(
            f"{where}.role: expected 'user' or 'assistant', got {str(role)[:40]!r}", param=f"{where}.role"
        )
    content = item.get("content")
    if isinstance(content, str):
        return [ChatMessage(role=role, content=content)]
    if not isinstance(content, list):
        raise _invalid(f"{where}.content", "a string or an array of content blocks", content)
    texts: list[str] = []
    calls: list[ToolCall] = []
    results: list[ChatMessage] = []
    for j, block in enumerate(content):
        at = f"{where}.content.{j}"
        if not isinstance(block, dict):
            raise _invalid(at, "an object", block)
        kind = block.get("type")
        if kind == "text":
            text = block.get("text")
            if not isinstance(text, str):
                raise _invalid(f"{at}.text", "a string", text)
            texts.append(text)
        elif kind == "tool_use" and role == "assistant":
            calls.append(_tool_use(block, at))
        elif kind == "tool_result" and role == "user":
            results.append(_tool_result(block, at))
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            continue  # an earlier turn's reasoning: not part of what the model reads again
        else:
            raise unsupported(f"{at}.type", f"a {role} block of type {str(kind)[:40]!r}")
    text = "\n".join(texts)
    if role == "assistant":
        return [ChatMessage(role="assistant", content=text, tool_calls=tuple(calls))]
    return [*results, *([ChatMessage(role="user", content=text)] if texts or not results else [])]


def _messages(data: Mapping[str, Any]) -> tuple[ChatMessage, ...]:
    value = data.get("messages")
    if value is None:
        raise InvalidRequest("messages: Field required", param="messages")
    if not isinstance(value, list):
        raise _invalid("messages", "an array", value)
    if not value:
        raise InvalidRequest("messages: at least one message is required", param="messages")
    out: list[ChatMessage] = [*_system(data)]
    for i, item in enumerate(value):
        out += _turn(item, i)
    return tuple(out)


def _stop_sequences(data: Mapping[str, Any]) -> tuple[str, ...]:
    value = data.get("stop_sequences")
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _invalid("stop_sequences", "an array of strings", value)
    if len(value) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(
            f"stop_sequences: at most {MAX_STOP_SEQUENCES} are allowed", param="stop_sequences"
        )
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item:
            raise _invalid(f"stop_sequences.{i}", "a non-empty string", item)
    return tuple(value)


def _tools(data: Mapping[str, Any]) -> tuple[ToolSpec, ...]:
    value = data.get("tools")
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _invalid("tools", "an array", value)
    if len(value) > MAX_TOOLS:
        raise InvalidRequest(f"tools: at most {MAX_TOOLS} tools are allowed", param="tools")
    out: list[ToolSpec] = []
    names: set[str] = set()
    for i, tool in enumerate(value):
        where = f"tools.{i}"
        if not isinstance(tool, dict):
            raise _invalid(where, "an object", tool)
        if tool.get("type") not in (None, "custom"):
            raise unsupported(f"{where}.type", f"the server tool {str(tool.get('type'))[:40]!r}")
        name = tool.get("name")
        if not isinstance(name, str) or not name or len(name) > 128:
            raise _invalid(f"{where}.name", "a name of 1 to 128 characters", name)
        if name in names:
            raise InvalidRequest(f"{where}.name: two tools are named {name!r}", param=f"{where}.name")
        names.add(name)
        description = tool.get("description")
        if description is not None and not isinstance(description, str):
            raise _invalid(f"{where}.description", "a string", description)
        schema = tool.get("input_schema")
        if not isinstance(schema, dict):
            raise _invalid(f"{where}.input_schema", "an object (a JSON schema)", schema)
        if len(orjson.dumps(schema)) > MAX_SCHEMA_BYTES:
            raise InvalidRequest(
                f"{where}.input_schema: larger than {MAX_SCHEMA_BYTES} bytes", param=f"{where}.input_schema"
            )
        out.append(ToolSpec(name=name, description=description, parameters=schema))
    return tuple(out)


def _tool_choice(data: Mapping[str, Any], tools: tuple[ToolSpec, ...]) -> tuple[str, bool]:
    """The engine's tool choice ("auto", "none", "required" or a tool's name) and parallel calls."""
    value = data.get("tool_choice")
    if value is None:
        return ("auto" if tools else "none"), True
    if not isinstance(value, dict):
        raise _invalid("tool_choice", "an object", value)
    parallel = value.get("disable_parallel_tool_use", False)
    if not isinstance(parallel, bool):
        raise _invalid("tool_choice.disable_parallel_tool_use", "a boolean", parallel)
    kind = value.get("type")
    if kind == "none":
        return "none", not parallel
    if kind not in ("auto", "any", "tool"):
        raise InvalidRequest(
            f"tool_choice.type: expected 'auto', 'any', 'tool' or 'none', got {str(kind)[:40]!r}",
            param="tool_choice.type",
        )
    if not tools:
        raise InvalidRequest(f"tool_choice: {kind!r} but no tools were given", param="tool_choice")
    if kind == "auto":
        return "auto", not parallel
    if kind == "any":
        return "required", not parallel
    name = value.get("name")
    if not isinstance(name, str) or not any(t.name == name for t in tools):
        raise InvalidRequest(
            f"tool_choice.name: {str(name)[:64]!r} is not one of the tools", param="tool_choice.name"
        )
    return name, False


def _refuse(data: Mapping[str, Any]) -> None:
    thinking = data.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") not in (None, "disabled"):
        raise unsupported("thinking", "extended thinking")
    if data.get("mcp_servers"):
        raise unsupported("mcp_servers", "a remote MCP server")
    metadata = data.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise _invalid("metadata", "an object", metadata)


def _parse(body: bytes, *, counting: bool) -> MessagesRequest:
    data = _decode(body)
    model = _model(data)
    max_tokens = _integer(data, "max_tokens", 1, MAX_TOKENS_LIMIT)
    if max_tokens is None and not counting:
        raise InvalidRequest("max_tokens: Field required", param="max_tokens")
    _refuse(data)
    messages = _messages(data)
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise _invalid("stream", "a boolean", stream)
    tools = _tools(data)
    tool_choice, parallel = _tool_choice(data, tools)
    sampling = SamplingOverrides(
        temperature=_number(data, "temperature", 0.0, 1.0),
        top_p=_number(data, "top_p", 0.0, 1.0),
        top_k=_integer(data, "top_k", 0, 2**31 - 1),
        max_tokens=None if counting else max_tokens,
    )
    return MessagesRequest(
        model=model,
        messages=messages,
        sampling=sampling,
        stop_sequences=_stop_sequences(data),
        stream=stream and not counting,
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=parallel,
    )


def parse_messages_request(body: bytes) -> MessagesRequest:
    """The body of `POST /v1/messages`; `InvalidRequest` (400) naming the field that is wrong."""
    return _parse(body, counting=False)


def parse_count_tokens_request(body: bytes) -> MessagesRequest:
    """The body of `POST /v1/messages/count_tokens`: as a message, without `max_tokens`."""
    return _parse(body, counting=True)


# --------------------------------------------------------------------------------------------------
# Responses


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def new_tool_use_id() -> str:
    return f"toolu_{uuid.uuid4().hex[:24]}"


def text_block(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def tool_input(call: ToolCall) -> dict[str, Any]:
    """A call's arguments as the object `tool_use.input` is (a non-object is wrapped)."""
    try:
        value = orjson.loads(call.arguments or "{}")
    except orjson.JSONDecodeError:
        return {"arguments": call.arguments}
    return value if isinstance(value, dict) else {"arguments": value}


def tool_use_block(call: ToolCall, *, with_input: bool = True) -> dict[str, Any]:
    """A `tool_use` block; streamed, it starts with an empty input that `input_json_delta`s fill."""
    return {
        "type": "tool_use",
        "id": call.id,
        "name": call.name,
        "input": tool_input(call) if with_input else {},
    }


def _usage(usage: Usage) -> dict[str, int]:
    return {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens}


def message_json(
    *,
    id: str,
    model: str,
    content: Sequence[dict[str, Any]],
    stop_reason: StopReason,
    stop_sequence: str | None,
    usage: Usage,
) -> bytes:
    return orjson.dumps(
        {
            "id": id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": list(content),
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": _usage(usage),
        }
    )


def count_tokens_json(input_tokens: int) -> bytes:
    return orjson.dumps({"input_tokens": input_tokens})


# Streaming: `event: <name>` lines, each with its JSON (whose `type` repeats the name).


def event(name: str, data: Mapping[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def message_start(*, id: str, model: str, input_tokens: int = 0) -> bytes:
    message: dict[str, Any] = {
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": 0},
    }
    return event("message_start", {"type": "message_start", "message": message})


def ping() -> bytes:
    return event("ping", {"type": "ping"})


def content_block_start(index: int, block: Mapping[str, Any]) -> bytes:
    return event(
        "content_block_start", {"type": "content_block_start", "index": index, "content_block": block}
    )


def text_delta(index: int, text: str) -> bytes:
    delta = {"type": "text_delta", "text": text}
    return event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})


def input_json_delta(index: int, partial_json: str) -> bytes:
    delta = {"type": "input_json_delta", "partial_json": partial_json}
    return event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})


def content_block_stop(index: int) -> bytes:
    return event("content_block_stop", {"type": "content_block_stop", "index": index})


def message_delta(*, stop_reason: StopReason, stop_sequence: str | None, usage: Usage) -> bytes:
    return event(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
            "usage": _usage(usage),
        },
    )


def message_stop() -> bytes:
    return event("message_stop", {"type": "message_stop"})


# --------------------------------------------------------------------------------------------------
# Models (`GET /v1/models` with an `anthropic-version` header)


def model_object(listing: ModelListing) -> dict[str, Any]:
    created = datetime.datetime.fromtimestamp(listing.created, tz=datetime.UTC)
    return {
        "type": "model",
        "id": listing.id,
        "display_name": listing.id,
        "created_at": created.isoformat().replace("+00:00", "Z"),
    }


def model_json(listing: ModelListing) -> bytes:
    return orjson.dumps(model_object(listing))


def model_list_json(listings: Sequence[ModelListing]) -> bytes:
    data = [model_object(listing) for listing in listings]
    return orjson.dumps(
        {
            "data": data,
            "has_more": False,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }
    )
