"""The wire format of `POST /v1/responses` (OpenAI's Responses API), stateless: parsing and validation
into engine types, and the response object and stream events, as bytes. No I/O here.

    parse_responses_request(body) -> ResponsesRequest     a 400 naming the field on anything refused
    response_object(...)                                  the `response` object (answer and stream events)
    message_item(...) / function_call_item(...)           its output items
    ResponseStream(...)                                   a stream's typed events, numbered in order

What maps to what: `instructions` is a system message first; `input` is a string (one user message) or
items — messages (`developer` becomes `system`; `input_text` / `output_text` / `refusal` parts are
joined), `function_call` items (an assistant turn's calls; consecutive ones are one turn) and
`function_call_output` items (a `tool` turn); `tools` are function tools, `tool_choice` as chat's;
`text.format` is the engine's `ResponseFormat`; `max_output_tokens`, `temperature`, `top_p`.
Nothing is stored (`store` is accepted and answered `false`), so `previous_response_id` and
`item_reference` items are refused with a 400 naming them.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson

from helexa.engine.base import ChatMessage, ResponseFormat, Role, ToolCall, ToolSpec, Usage
from helexa.mesh.errors import InvalidRequest
from helexa.mesh.server.openai_wire import (
    MAX_SCHEMA_BYTES,
    MAX_TOOLS,
    SamplingOverrides,
    boolean_field,
    common_fields,
    decode_body,
    integer_field,
    invalid_type,
    model_field,
    number_field,
    optional_str_field,
    unsupported,
)

__all__ = [
    "ResponseStatus",
    "ResponseStream",
    "ResponsesRequest",
    "function_call_item",
    "message_item",
    "new_item_id",
    "new_response_id",
    "output_text_part",
    "parse_responses_request",
    "response_object",
]

ResponseStatus = Literal["in_progress", "completed", "incomplete", "failed"]

_MESSAGE_ROLES: Final[dict[str, Role]] = {
    "user": "user",
    "system": "system",
    "developer": "system",
    "assistant": "assistant",
}
# Input items a stateless server has nothing to do with: refused by name.
_STATEFUL_ITEMS: Final = frozenset({"item_reference"})
# Item types the model never produced here, so a client cannot be sending them back.
_UNSUPPORTED_ITEMS_HINT: Final = "only 'message', 'function_call' and 'function_call_output' items"


@dataclass(frozen=True, kw_only=True, slots=True)
class ResponsesRequest:
    """A parsed `POST /v1/responses` body: what the engine needs, and what the response object repeats."""

    model: str
    messages: tuple[ChatMessage, ...]
    sampling: SamplingOverrides
    stream: bool = False
    instructions: str | None = None
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: str = "none"
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    # The request's own fields as the response object repeats them (normalised).
    tools_json: tuple[dict[str, Any], ...] = ()
    tool_choice_json: str | dict[str, Any] = "auto"
    text_json: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None

    @property
    def parses_calls(self) -> bool:
        """Whether the output may hold function calls (parsed out of the text, never shown as text)."""
        return bool(self.tools) and self.tool_choice != "none"


# --------------------------------------------------------------------------------------------------
# Parsing


def _content_text(content: object, param: str) -> str:
    """A message's content (a string or a list of text parts) as text."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid_type(param, "a string or an array of content parts", content)
    texts: list[str] = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise invalid_type(where, "an object", part)
        kind = part.get("type")
        field = "refusal" if kind == "refusal" else "text"
        if kind in ("input_text", "output_text", "text", "refusal"):
            text = part.get(field)
            if not isinstance(text, str):
                raise invalid_type(f"{where}.{field}", "a string", text)
            texts.append(text)
        elif isinstance(kind, str):
            raise unsupported(f"{where}.type", f"content of type {kind[:40]!r} (only text)")
        else:
            raise invalid_type(f"{where}.type", "a string", kind)
    return "\n".join(texts)


def _required_str(item: Mapping[str, Any], name: str, where: str) -> str:
    value = item.get(name)
    if value is None:
        raise InvalidRequest(
            f"Missing required parameter: '{where}.{name}'.",
            param=f"{where}.{name}",
            code="missing_required_parameter",
        )
    if not isinstance(value, str):
        raise invalid_type(f"{where}.{name}", "a string", value)
    return value


def _input_messages(data: Mapping[str, Any]) -> list[ChatMessage]:
    value = data.get("input")
    if value is None:
        raise InvalidRequest(
            "Missing required parameter: 'input'.", param="input", code="missing_required_parameter"
        )
    if isinstance(value, str):
        return [ChatMessage(role="user", content=value)]
    if not isinstance(value, list):
        raise invalid_type("input", "a string or an array of input items", value)
    out: list[ChatMessage] = []
    call_names: dict[str, str] = {}
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise invalid_type(where, "an object", item)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in _MESSAGE_ROLES:
                raise InvalidRequest(
                    f"Invalid value for '{where}.role': {str(role)[:40]!r}. Supported values are: "
                    "'user', 'system', 'developer' and 'assistant'.",
                    param=f"{where}.role",
                    code="invalid_value",
                )
            content = item.get("content")
            if content is None:
                raise InvalidRequest(
                    f"Missing required parameter: '{where}.content'.",
                    param=f"{where}.content",
                    code="missing_required_parameter",
                )
            out.append(
                ChatMessage(role=_MESSAGE_ROLES[role], content=_content_text(content, f"{where}.content"))
            )
        elif kind == "function_call":
            call_id = _required_str(item, "call_id", where)
            name = _required_str(item, "name", where)
            arguments = _required_str(item, "arguments", where)
            call_names[call_id] = name
            call = ToolCall(id=call_id, name=name, arguments=arguments)
            last = out[-1] if out else None
            if last is not None and last.role == "assistant":  # one assistant turn: its text and calls
                out[-1] = ChatMessage(
                    role="assistant", content=last.content, tool_calls=(*last.tool_calls, call)
                )
            else:
                out.append(ChatMessage(role="assistant", content="", tool_calls=(call,)))
        elif kind == "function_call_output":
            call_id = _required_str(item, "call_id", where)
            output = item.get("output")
            if output is None:
                raise InvalidRequest(
                    f"Missing required parameter: '{where}.output'.",
                    param=f"{where}.output",
                    code="missing_required_parameter",
                )
            out.append(
                ChatMessage(
                    role="tool",
                    content=_content_text(output, f"{where}.output"),
                    name=call_names.get(call_id),
                    tool_call_id=call_id,
                )
            )
        elif kind in _STATEFUL_ITEMS:
            raise unsupported(f"{where}.type", "'item_reference' (responses are not stored)")
        elif isinstance(kind, str):
            raise unsupported(
                f"{where}.type", f"input items of type {kind[:40]!r} ({_UNSUPPORTED_ITEMS_HINT})"
            )
        else:
            raise invalid_type(f"{where}.type", "a string", kind)
    if not out:
        raise InvalidRequest("'input' must not be empty.", param="input", code="invalid_value")
    return out


def _schema_size_ok(schema: dict[str, Any], param: str) -> None:
    if len(orjson.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise InvalidRequest(
            f"'{param}' is larger than {MAX_SCHEMA_BYTES} bytes.", param=param, code="invalid_value"
        )


def _tools(data: Mapping[str, Any]) -> tuple[tuple[ToolSpec, ...], tuple[dict[str, Any], ...]]:
    """Function tools (`{"type": "function", "name", "description", "parameters", "strict"}`): the specs
    and their normalised wire form (repeated in the response object)."""
    value = data.get("tools")
    if value is None:
        return (), ()
    if not isinstance(value, list):
        raise invalid_type("tools", "an array", value)
    if len(value) > MAX_TOOLS:
        raise InvalidRequest(
            f"'tools' may hold at most {MAX_TOOLS} tools.", param="tools", code="invalid_value"
        )
    specs: list[ToolSpec] = []
    wire: list[dict[str, Any]] = []
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise invalid_type(where, "an object", tool)
        kind = tool.get("type")
        if kind != "function":
            raise unsupported(f"{where}.type", f"tools of type {str(kind)[:40]!r} (only 'function')")
        name = tool.get("name")
        if not isinstance(name, str) or not name or len(name) > 64:
            raise invalid_type(f"{where}.name", "a name of 1 to 64 characters", name)
        if any(s.name == name for s in specs):
            raise InvalidRequest(
                f"two tools are named {name!r}.", param=f"{where}.name", code="invalid_value"
            )
        description = optional_str_field(tool, "description") if "description" in tool else None
        parameters = tool.get("parameters")
        if parameters is not None:
            if not isinstance(parameters, dict):
                raise invalid_type(f"{where}.parameters", "an object (a JSON schema)", parameters)
            _schema_size_ok(parameters, f"{where}.parameters")
        strict = boolean_field(tool, "strict", f"{where}.strict")
        specs.append(ToolSpec(name=name, description=description, parameters=parameters))
        wire.append(
            {
                "type": "function",
                "name": name,
                "description": description,
                "parameters": parameters,
                "strict": strict if strict is not None else True,
            }
        )
    return tuple(specs), tuple(wire)


def _tool_choice(data: Mapping[str, Any], tools: tuple[ToolSpec, ...]) -> tuple[str, str | dict[str, Any]]:
    """The engine's choice ("auto", "none", "required" or a function's name) and its wire form."""
    value = data.get("tool_choice")
    if value is None:
        return ("auto" if tools else "none"), "auto"
    if value in ("auto", "none", "required"):
        if value == "required" and not tools:
            raise InvalidRequest(
                "'tool_choice' is 'required' but no 'tools' were given.",
                param="tool_choice",
                code="invalid_value",
            )
        return (str(value) if tools else "none"), str(value)
    if isinstance(value, dict) and value.get("type") == "function":
        name = value.get("name")
        if isinstance(name, str) and any(t.name == name for t in tools):
            return name, {"type": "function", "name": name}
        raise InvalidRequest(
            f"'tool_choice' names {str(name)[:64]!r}, which is not one of the 'tools'.",
            param="tool_choice.name",
            code="invalid_value",
        )
    raise invalid_type("tool_choice", "'none', 'auto', 'required' or a named function", value)


def _text_format(data: Mapping[str, Any]) -> tuple[ResponseFormat | None, dict[str, Any] | None]:
    """`text.format`: `text` (None), `json_object`, or `json_schema` (`name`, `schema`, `strict`)."""
    text = data.get("text")
    if text is None:
        return None, None
    if not isinstance(text, dict):
        raise invalid_type("text", "an object", text)
    fmt = text.get("format")
    if fmt is None:
        return None, {"format": {"type": "text"}}
    if not isinstance(fmt, dict):
        raise invalid_type("text.format", "an object", fmt)
    kind = fmt.get("type")
    if kind == "text":
        return None, {"format": {"type": "text"}}
    if kind == "json_object":
        return ResponseFormat(type="json_object", param="text.format"), {"format": {"type": "json_object"}}
    if kind != "json_schema":
        raise InvalidRequest(
            f"Invalid value for 'text.format.type': {str(kind)[:40]!r}. Supported values are: 'text', "
            "'json_object' and 'json_schema'.",
            param="text.format.type",
            code="invalid_value",
        )
    name = fmt.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequest(
            "'text.format.name' is required (a string).",
            param="text.format.name",
            code="missing_required_parameter" if name is None else "invalid_value",
        )
    schema = fmt.get("schema")
    if not isinstance(schema, dict):
        if schema is None:
            raise InvalidRequest(
                "Missing required parameter: 'text.format.schema'.",
                param="text.format.schema",
                code="missing_required_parameter",
            )
        raise invalid_type("text.format.schema", "an object (a JSON schema)", schema)
    _schema_size_ok(schema, "text.format.schema")
    strict = boolean_field(fmt, "strict", "text.format.strict")
    description = optional_str_field(fmt, "description")
    wire: dict[str, Any] = {"type": "json_schema", "name": name, "schema": schema, "strict": strict}
    if description is not None:
        wire["description"] = description
    return ResponseFormat(type="json_schema", schema=schema, param="text.format.schema"), {"format": wire}


def _refuse_stateful(data: Mapping[str, Any]) -> None:
    if data.get("previous_response_id") is not None:
        raise unsupported(
            "previous_response_id", "'previous_response_id' (responses are not stored; send the whole input)"
        )
    if data.get("conversation") is not None:
        raise unsupported("conversation", "'conversation' (responses are not stored; send the whole input)")
    if data.get("background"):
        raise unsupported("background", "background responses")


def parse_responses_request(body: bytes) -> ResponsesRequest:
    """Parse and validate a `POST /v1/responses` body."""
    data = decode_body(body)
    model = model_field(data)
    _refuse_stateful(data)
    instructions = optional_str_field(data, "instructions")
    messages = _input_messages(data)
    if instructions:
        messages.insert(0, ChatMessage(role="system", content=instructions))
    tools, tools_json = _tools(data)
    tool_choice, tool_choice_json = _tool_choice(data, tools)
    response_format, text_json = _text_format(data)
    boolean_field(data, "store")
    user = common_fields(data)
    metadata = data.get("metadata")
    return ResponsesRequest(
        model=model,
        messages=tuple(messages),
        sampling=SamplingOverrides(
            temperature=number_field(data, "temperature", 0.0, 2.0),
            top_p=number_field(data, "top_p", 0.0, 1.0),
            max_tokens=integer_field(data, "max_output_tokens", 1, 2**31 - 1),
            max_tokens_param="max_output_tokens",
        ),
        stream=bool(boolean_field(data, "stream")),
        instructions=instructions,
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=boolean_field(data, "parallel_tool_calls") is not False,
        response_format=response_format,
        tools_json=tools_json,
        tool_choice_json=tool_choice_json,
        text_json=text_json,
        metadata=metadata if isinstance(metadata, dict) else None,
        user=user,
    )


# --------------------------------------------------------------------------------------------------
# Building


def new_response_id() -> str:
    return f"resp_{secrets.token_hex(24)}"


def new_item_id(prefix: Literal["msg", "fc"]) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


def _usage(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


def output_text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(
    item_id: str, text: str | None, status: Literal["in_progress", "completed", "incomplete"]
) -> dict[str, Any]:
    """An assistant `message` item; `text` None: no content part yet (a stream's first sight of it)."""
    return {
        "id": item_id,
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": [] if text is None else [output_text_part(text)],
    }


def function_call_item(
    item_id: str, call: ToolCall, status: Literal["in_progress", "completed"] = "completed"
) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments if status == "completed" else "",
        "status": status,
    }


def response_object(
    request: ResponsesRequest,
    *,
    id: str,
    model: str,
    created_at: int,
    status: ResponseStatus,
    output: list[dict[str, Any]],
    usage: Usage | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The `response` object; `status` incomplete means the output reached `max_output_tokens`."""
    body: dict[str, Any] = {
        "id": id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "error": error,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": request.instructions,
        "max_output_tokens": request.sampling.max_tokens,
        "metadata": request.metadata or {},
        "model": model,
        "output": output,
        "parallel_tool_calls": request.parallel_tool_calls,
        "previous_response_id": None,
        "store": False,
        "temperature": request.sampling.temperature,
        "text": request.text_json or {"format": {"type": "text"}},
        "tool_choice": request.tool_choice_json,
        "tools": list(request.tools_json),
        "top_p": request.sampling.top_p,
        "truncation": "disabled",
        "usage": None if usage is None else _usage(usage),
    }
    if request.user is not None:  # a string or absent (the published schema does not allow null)
        body["user"] = request.user
    return body


class ResponseStream:
    """The typed events of one streamed response, in the order the SDKs expect, each numbered
    (`sequence_number` from 0): `start()`, then `text()` / `call()` as the output arrives, then `end()`.

    Text opens a `message` item (`output_item.added`, `content_part.added`) and streams as
    `output_text.delta`; a call (or the end) closes it (`output_text.done`, `content_part.done`,
    `output_item.done`). A call is a `function_call` item with its arguments in one
    `function_call_arguments.delta`. `end()` sends `response.completed` (or `response.incomplete`)
    with the whole output and the usage. `output` holds the items so far.
    """

    def __init__(self, request: ResponsesRequest, *, id: str, model: str, created_at: int) -> None:
        self._request = request
        self._id, self._model, self._created_at = id, model, created_at
        self._next = 0
        self.output: list[dict[str, Any]] = []
        self._message: str | None = None  # the open message item's id
        self._text: list[str] = []

    def _event(self, type: str, **fields: Any) -> bytes:
        data = orjson.dumps({"type": type, "sequence_number": self._next, **fields})
        self._next += 1
        return b"event: " + type.encode() + b"\ndata: " + data + b"\n\n"

    def _response(self, status: ResponseStatus, usage: Usage | None = None) -> dict[str, Any]:
        return response_object(
            self._request,
            id=self._id,
            model=self._model,
            created_at=self._created_at,
            status=status,
            output=self.output,
            usage=usage,
        )

    def start(self) -> list[bytes]:
        return [
            self._event("response.created", response=self._response("in_progress")),
            self._event("response.in_progress", response=self._response("in_progress")),
        ]

    def text(self, delta: str) -> list[bytes]:
        if not delta:
            return []
        out: list[bytes] = []
        if self._message is None:
            self._message = new_item_id("msg")
            self._text = []
            index = len(self.output)
            out.append(
                self._event(
                    "response.output_item.added",
                    output_index=index,
                    item=message_item(self._message, None, "in_progress"),
                )
            )
            out.append(
                self._event(
                    "response.content_part.added",
                    item_id=self._message,
                    output_index=index,
                    content_index=0,
                    part=output_text_part(""),
                )
            )
            self.output.append(message_item(self._message, "", "in_progress"))
        self._text.append(delta)
        out.append(
            self._event(
                "response.output_text.delta",
                item_id=self._message,
                output_index=len(self.output) - 1,
                content_index=0,
                delta=delta,
                logprobs=[],
            )
        )
        return out

    def _close_message(self, status: Literal["completed", "incomplete"]) -> list[bytes]:
        if self._message is None:
            return []
        item_id, text, index = self._message, "".join(self._text), len(self.output) - 1
        self._message = None
        item = message_item(item_id, text, status)
        self.output[index] = item
        where = {"item_id": item_id, "output_index": index, "content_index": 0}
        return [
            self._event("response.output_text.done", **where, text=text, logprobs=[]),
            self._event("response.content_part.done", **where, part=output_text_part(text)),
            self._event("response.output_item.done", output_index=index, item=item),
        ]

    def call(self, call: ToolCall) -> list[bytes]:
        out = self._close_message("completed")
        item_id, index = new_item_id("fc"), len(self.output)
        where = {"item_id": item_id, "output_index": index}
        item = function_call_item(item_id, call)
        self.output.append(item)
        out += [
            self._event(
                "response.output_item.added",
                output_index=index,
                item=function_call_item(item_id, call, "in_progress"),
            ),
            self._event("response.function_call_arguments.delta", **where, delta=call.arguments),
            self._event("response.function_call_arguments.done", **where, arguments=call.arguments),
            self._event("response.output_item.done", output_index=index, item=item),
        ]
        return out

    def end(self, usage: Usage, *, incomplete: bool) -> list[bytes]:
        """The closing events; `incomplete`: the output reached `max_output_tokens`."""
        out = self._close_message("incomplete" if incomplete else "completed")
        if incomplete:
            return [*out, self._event("response.incomplete", response=self._response("incomplete", usage))]
        return [*out, self._event("response.completed", response=self._response("completed", usage))]
