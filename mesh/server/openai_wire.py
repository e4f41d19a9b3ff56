"""OpenAI wire types: request parsing/validation and response builders. The only OpenAI-shaped code.

Requests: `parse_chat_request(body)` / `parse_completion_request(body)` turn raw bytes into frozen
dataclasses carrying `engine.base` types, or raise `mesh.errors.InvalidRequest` whose `param` names the
offending field the way OpenAI does (`messages[2].content`, `stop[1]`, `stream_options.include_usage`).
They accept what the OpenAI API accepts (content as a string or a list of text parts, `content: null`
on assistant turns, several system messages, the `developer` role, `max_tokens` and
`max_completion_tokens`, unknown fields ignored) and refuse clearly what we cannot honour (`n > 1`,
tools, logprobs, non-text response formats).

Sampling fields a request leaves out stay `None` in `SamplingOverrides`; `resolve_sampling` fills them
from the catalogue entry's `defaults`, then from `engine.base.SamplingParams`' own defaults.

Responses: builders return the encoded bytes (orjson), ready for the body or an SSE `data:` line.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson

from helexa.engine.base import (
    ChatMessage,
    FinishReason,
    ResponseFormat,
    Role,
    SamplingParams,
    TokenLogprob,
    ToolCall,
    ToolSpec,
    Usage,
)
from helexa.mesh.errors import InvalidRequest
from helexa.mesh.routing.decisions import ModelListing

MAX_STOP_SEQUENCES: Final = 4
_ROLES: Final[frozenset[str]] = frozenset({"system", "user", "assistant", "tool", "developer"})
# Roles whose turns may have `content: null` (or leave it out): an assistant turn that only called tools.
_NULLABLE_CONTENT_ROLES: Final[frozenset[str]] = frozenset({"assistant"})
_MAX_SEED: Final = 2**63 - 1


# --------------------------------------------------------------------------------------------------
# Request types


@dataclass(frozen=True, kw_only=True, slots=True)
class SamplingOverrides:
    """Sampling fields as the client sent them; `None` = left out (the catalogue default applies).

    `max_tokens_param` records which field carried `max_tokens` (`max_tokens` or
    `max_completion_tokens`) so a later limit check names the field the client actually used.
    """

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    max_tokens: int | None = None
    max_tokens_param: str = "max_tokens"
    stop: tuple[str, ...] | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


# One prompt of `/v1/completions`: text, or token ids.
PromptInput = str | tuple[int, ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class ChatCompletionRequest:
    model: str
    messages: tuple[ChatMessage, ...]
    sampling: SamplingOverrides
    stream: bool = False
    include_usage: bool = False
    user: str | None = None
    n: int = 1
    logprobs: int | None = None  # None: not asked; else how many alternatives (`top_logprobs`)
    response_format: ResponseFormat | None = None
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: str = "none"
    parallel_tool_calls: bool = True


@dataclass(frozen=True, kw_only=True, slots=True)
class CompletionRequest:
    model: str
    prompt: str  # the first prompt's text ("" for token ids)
    sampling: SamplingOverrides
    stream: bool = False
    include_usage: bool = False
    user: str | None = None
    prompts: tuple[PromptInput, ...] = ()  # every prompt (a list of strings or of token-id lists)
    n: int = 1
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None  # fill in the middle: the text after the insertion

    @property
    def all_prompts(self) -> tuple[PromptInput, ...]:
        return self.prompts or (self.prompt,)


def resolve_sampling(overrides: SamplingOverrides, defaults: Mapping[str, float | int]) -> SamplingParams:
    """Request value if given, else the catalogue entry's default, else `SamplingParams`' default."""
    base = SamplingParams()

    def pick_float(name: str, given: float | None, fallback: float) -> float:
        if given is not None:
            return given
        value = defaults.get(name)
        return float(value) if value is not None else fallback

    def pick_int(name: str, given: int | None, fallback: int | None) -> int | None:
        if given is not None:
            return given
        value = defaults.get(name)
        return int(value) if value is not None else fallback

    return SamplingParams(
        temperature=pick_float("temperature", overrides.temperature, base.temperature),
        top_p=pick_float("top_p", overrides.top_p, base.top_p),
        top_k=pick_int("top_k", overrides.top_k, base.top_k) or 0,
        min_p=pick_float("min_p", overrides.min_p, base.min_p),
        seed=pick_int("seed", overrides.seed, base.seed),
        max_tokens=pick_int("max_tokens", overrides.max_tokens, base.max_tokens),
        stop=overrides.stop if overrides.stop is not None else base.stop,
        stop_token_ids=overrides.stop_token_ids,
        presence_penalty=pick_float("presence_penalty", overrides.presence_penalty, base.presence_penalty),
        frequency_penalty=pick_float(
            "frequency_penalty", overrides.frequency_penalty, base.frequency_penalty
        ),
        repetition_penalty=pick_float(
            "repetition_penalty", overrides.repetition_penalty, base.repetition_penalty
        ),
        logit_bias=overrides.logit_bias,
        ignore_eos=overrides.ignore_eos,
    )


# --------------------------------------------------------------------------------------------------
# Parsing


def _decode(body: bytes) -> dict[str, Any]:
    if not body:
        raise InvalidRequest("the request body is empty; send a JSON object", code="invalid_json")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_json")
    return data


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
    }.get(type(value), type(value).__name__)


def _invalid_type(param: str, expected: str, value: object) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid type for '{param}': expected {expected}, but got {_type_name(value)}.",
        param=param,
        code="invalid_type",
    )


def _unsupported(param: str, what: str) -> InvalidRequest:
    return InvalidRequest(
        f"'{param}': {what} is not supported by this server.", param=param, code="unsupported"
    )


def _number(data: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid_type(name, "a number", value)
    if not low <= value <= high:  # NaN is impossible: JSON has none and orjson refuses it
        raise InvalidRequest(
            f"'{name}' must be between {low:g} and {high:g}, got {value!r}.", param=name, code="invalid_value"
        )
    return float(value)


def _integer(data: Mapping[str, Any], name: str, low: int, high: int) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid_type(name, "an integer", value)
    if not low <= value <= high:
        raise InvalidRequest(
            f"'{name}' must be between {low} and {high}, got {value}.", param=name, code="invalid_value"
        )
    return value


def _boolean(data: Mapping[str, Any], name: str, param: str | None = None) -> bool | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise _invalid_type(param or name, "a boolean", value)
    return value


def _optional_str(data: Mapping[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _invalid_type(name, "a string", value)
    return value


def _model(data: Mapping[str, Any]) -> str:
    value = data.get("model")
    if value is None:
        raise InvalidRequest(
            "you must provide a model parameter", param="model", code="missing_required_parameter"
        )
    if not isinstance(value, str):
        raise _invalid_type("model", "a string", value)
    if not value.strip():
        raise InvalidRequest("'model' must not be empty", param="model", code="invalid_value")
    return value


def _stop(data: Mapping[str, Any]) -> tuple[str, ...] | None:
    value = data.get("stop")
    if value is None:
        return None
    items: Sequence[object]
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, list):
        items = value
    else:
        raise _invalid_type("stop", "a string or an array of strings", value)
    if len(items) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(
            f"'stop' may hold at most {MAX_STOP_SEQUENCES} sequences, got {len(items)}.",
            param="stop",
            code="invalid_value",
        )
    out: list[str] = []
    for i, item in enumerate(items):
        param = "stop" if isinstance(value, str) else f"stop[{i}]"
        if not isinstance(item, str):
            raise _invalid_type(param, "a string", item)
        if not item:
            raise InvalidRequest(f"'{param}' must not be an empty string.", param=param, code="invalid_value")
        out.append(item)
    return tuple(out)


# OpenAI caps `logit_bias` at 300 tokens; vLLM's `stop_token_ids` has no cap, ours keeps requests small.
_MAX_LOGIT_BIAS = 300
_MAX_STOP_TOKEN_IDS = 64
_MAX_TOKEN_ID = 2**31 - 1


def _logit_bias(data: Mapping[str, Any]) -> tuple[tuple[int, float], ...]:
    """OpenAI's `{"<token id>": bias}` map, biases in [-100, 100]."""
    value = data.get("logit_bias")
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise _invalid_type("logit_bias", "an object", value)
    if len(value) > _MAX_LOGIT_BIAS:
        raise InvalidRequest(
            f"'logit_bias' may hold at most {_MAX_LOGIT_BIAS} tokens.",
            param="logit_bias",
            code="invalid_value",
        )
    out: list[tuple[int, float]] = []
    for key, bias in value.items():
        token = key.strip() if isinstance(key, str) else ""
        if not token.isdigit() or int(token) > _MAX_TOKEN_ID:
            raise InvalidRequest(
                f"'logit_bias' keys must be token ids (non-negative integers as strings), got {key!r:.40}.",
                param="logit_bias",
                code="invalid_value",
            )
        param = f"logit_bias.{token}"
        number = _number({param: bias}, param, -100.0, 100.0)
        if number is None:
            raise _invalid_type(param, "a number", bias)
        out.append((int(token), number))
    return tuple(out)


def _stop_token_ids(data: Mapping[str, Any]) -> tuple[int, ...]:
    """vLLM's extension: token ids that end the generation like EOS."""
    value = data.get("stop_token_ids")
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > _MAX_STOP_TOKEN_IDS:
        raise _invalid_type("stop_token_ids", f"a list of at most {_MAX_STOP_TOKEN_IDS} token ids", value)
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item <= _MAX_TOKEN_ID:
            raise _invalid_type(f"stop_token_ids[{i}]", "a non-negative integer", item)
    return tuple(value)


def _sampling(data: Mapping[str, Any]) -> SamplingOverrides:
    repetition_penalty = _number(data, "repetition_penalty", 0.0, 10.0)
    if repetition_penalty is not None and repetition_penalty <= 0:
        raise InvalidRequest(
            "'repetition_penalty' must be greater than 0 (1 = no penalty).",
            param="repetition_penalty",
            code="invalid_value",
        )
    max_tokens_param = "max_tokens"
    max_tokens = _integer(data, "max_tokens", 1, 2**31 - 1)
    max_completion_tokens = _integer(data, "max_completion_tokens", 1, 2**31 - 1)
    if max_completion_tokens is not None:
        max_tokens, max_tokens_param = max_completion_tokens, "max_completion_tokens"
    top_k = _integer(data, "top_k", -1, 2**31 - 1)
    return SamplingOverrides(
        temperature=_number(data, "temperature", 0.0, 2.0),
        top_p=_number(data, "top_p", 0.0, 1.0),
        top_k=0 if top_k == -1 else top_k,  # -1 is vLLM's spelling of "no top-k"
        seed=_integer(data, "seed", -_MAX_SEED - 1, _MAX_SEED),
        max_tokens=max_tokens,
        max_tokens_param=max_tokens_param,
        stop=_stop(data),
        min_p=_number(data, "min_p", 0.0, 1.0),
        presence_penalty=_number(data, "presence_penalty", -2.0, 2.0),
        frequency_penalty=_number(data, "frequency_penalty", -2.0, 2.0),
        repetition_penalty=repetition_penalty,
        logit_bias=_logit_bias(data),
        stop_token_ids=_stop_token_ids(data),
        ignore_eos=bool(_boolean(data, "ignore_eos")),
    )


def _streaming(data: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = bool(_boolean(data, "stream"))
    options = data.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise _invalid_type("stream_options", "an object", options)
        include_usage = bool(_boolean(options, "include_usage", "stream_options.include_usage"))
        _boolean(options, "include_obfuscation", "stream_options.include_obfuscation")
    return stream, include_usage


def _common(data: Mapping[str, Any]) -> str | None:
    """Validate fields both endpoints share and ignore; return `user`."""
    metadata = data.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise _invalid_type("metadata", "an object", metadata)
        for key, value in metadata.items():
            if not isinstance(value, str):
                raise _invalid_type(f"metadata.{key}", "a string", value)
    return _optional_str(data, "user")


def _text_of(content: object, param: str) -> str:
    """Flatten a message's content (a string or a list of text parts) to text."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _invalid_type(param, "a string or an array of content parts", content)
    texts: list[str] = []
    for j, part in enumerate(content):
        part_param = f"{param}[{j}]"
        if isinstance(part, str):  # lenient: a bare string part
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise _invalid_type(part_param, "an object", part)
        kind = part.get("type")
        if kind in ("text", "input_text"):
            text = part.get("text")
            if not isinstance(text, str):
                raise _invalid_type(f"{part_param}.text", "a string", text)
            texts.append(text)
        elif kind == "refusal":
            refusal = part.get("refusal")
            if not isinstance(refusal, str):
                raise _invalid_type(f"{part_param}.refusal", "a string", refusal)
            texts.append(refusal)
        elif isinstance(kind, str):
            raise _unsupported(f"{part_param}.type", f"content part type '{kind}' (only text)")
        else:
            raise _invalid_type(f"{part_param}.type", "a string", kind)
    return "\n".join(texts)


def _message(item: object, i: int) -> ChatMessage:
    param = f"messages[{i}]"
    if not isinstance(item, dict):
        raise _invalid_type(param, "an object", item)
    role = item.get("role")
    if not isinstance(role, str):
        if role is None:
            raise InvalidRequest(
                f"Missing required parameter: '{param}.role'.",
                param=f"{param}.role",
                code="missing_required_parameter",
            )
        raise _invalid_type(f"{param}.role", "a string", role)
    if role == "function":
        raise _unsupported(f"{param}.role", "the 'function' role (function calling)")
    if role not in _ROLES:
        raise InvalidRequest(
            f"Invalid value for '{param}.role': '{role}'. Supported values are: "
            "'system', 'developer', 'user', 'assistant' and 'tool'.",
            param=f"{param}.role",
            code="invalid_value",
        )
    content = item.get("content")
    if content is None:
        if role not in _NULLABLE_CONTENT_ROLES:
            raise InvalidRequest(
                f"Invalid value for '{param}.content': a {role} message must have content.",
                param=f"{param}.content",
                code="invalid_value" if "content" in item else "missing_required_parameter",
            )
        text = ""
    else:
        text = _text_of(content, f"{param}.content")
    name = item.get("name")
    if name is not None and not isinstance(name, str):
        raise _invalid_type(f"{param}.name", "a string", name)
    calls = _message_tool_calls(item.get("tool_calls"), f"{param}.tool_calls") if role == "assistant" else ()
    tool_call_id = item.get("tool_call_id")
    if tool_call_id is not None and not isinstance(tool_call_id, str):
        raise _invalid_type(f"{param}.tool_call_id", "a string", tool_call_id)
    role_literal: Role = role  # type: ignore[assignment]  # checked against _ROLES above
    return ChatMessage(
        role=role_literal,
        content=text,
        name=name,
        tool_calls=calls,
        tool_call_id=tool_call_id if role == "tool" else None,
    )


def _message_tool_calls(value: object, param: str) -> tuple[ToolCall, ...]:
    """An assistant turn's `tool_calls` (the calls it made earlier in the conversation)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _invalid_type(param, "an array", value)
    out: list[ToolCall] = []
    for i, call in enumerate(value):
        where = f"{param}[{i}]"
        if not isinstance(call, dict):
            raise _invalid_type(where, "an object", call)
        function = call.get("function")
        if not isinstance(function, dict):
            raise _invalid_type(f"{where}.function", "an object", function)
        name, arguments = function.get("name"), function.get("arguments", "{}")
        if not isinstance(name, str) or not name:
            raise _invalid_type(f"{where}.function.name", "a string", name)
        if not isinstance(arguments, str):  # accept an object (some clients send one) as its JSON text
            arguments = orjson.dumps(arguments).decode()
        call_id = call.get("id")
        out.append(
            ToolCall(id=call_id if isinstance(call_id, str) else f"call_{i}", name=name, arguments=arguments)
        )
    return tuple(out)


def _messages(data: Mapping[str, Any]) -> tuple[ChatMessage, ...]:
    value = data.get("messages")
    if value is None:
        raise InvalidRequest(
            "Missing required parameter: 'messages'.", param="messages", code="missing_required_parameter"
        )
    if not isinstance(value, list):
        raise _invalid_type("messages", "an array", value)
    if not value:
        raise InvalidRequest(
            "'messages' must hold at least one message.", param="messages", code="invalid_value"
        )
    return tuple(_message(item, i) for i, item in enumerate(value))


# Tools one request may define (OpenAI's limit is 128).
MAX_TOOLS = 128


def _tools(data: Mapping[str, Any]) -> tuple[ToolSpec, ...]:
    value = data.get("tools")
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _invalid_type("tools", "an array", value)
    if len(value) > MAX_TOOLS:
        raise InvalidRequest(
            f"'tools' may hold at most {MAX_TOOLS} tools.", param="tools", code="invalid_value"
        )
    out: list[ToolSpec] = []
    names: set[str] = set()
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise _invalid_type(where, "an object", tool)
        if tool.get("type", "function") != "function":
            raise _unsupported(
                f"{where}.type", f"tools of type {str(tool.get('type'))[:40]!r} (only 'function')"
            )
        function = tool.get("function")
        if not isinstance(function, dict):
            raise _invalid_type(f"{where}.function", "an object", function)
        name = function.get("name")
        if not isinstance(name, str) or not name or len(name) > 64:
            raise _invalid_type(f"{where}.function.name", "a name of 1 to 64 characters", name)
        if name in names:
            raise InvalidRequest(
                f"two tools are named {name!r}.", param=f"{where}.function.name", code="invalid_value"
            )
        names.add(name)
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise _invalid_type(f"{where}.function.description", "a string", description)
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise _invalid_type(f"{where}.function.parameters", "an object (a JSON schema)", parameters)
        if parameters is not None and len(orjson.dumps(parameters)) > MAX_SCHEMA_BYTES:
            raise InvalidRequest(
                f"'{where}.function.parameters' is larger than {MAX_SCHEMA_BYTES} bytes.",
                param=f"{where}.function.parameters",
                code="invalid_value",
            )
        out.append(ToolSpec(name=name, description=description, parameters=parameters))
    return tuple(out)


def _tool_choice(data: Mapping[str, Any], tools: tuple[ToolSpec, ...]) -> str:
    """ "auto" (the default with tools), "none" (the default without), "required", or a function's name."""
    value = data.get("tool_choice")
    if value is None:
        return "auto" if tools else "none"
    if value in ("auto", "none", "required"):
        if value != "none" and not tools:
            raise InvalidRequest(
                f"'tool_choice' is {value!r} but no 'tools' were given.",
                param="tool_choice",
                code="invalid_value",
            )
        return str(value)
    if (
        isinstance(value, dict)
        and value.get("type") == "function"
        and isinstance(value.get("function"), dict)
    ):
        name = value["function"].get("name")
        if isinstance(name, str) and any(t.name == name for t in tools):
            return name
        raise InvalidRequest(
            f"'tool_choice' names {str(name)[:64]!r}, which is not one of the 'tools'.",
            param="tool_choice.function.name",
            code="invalid_value",
        )
    raise _invalid_type("tool_choice", "'none', 'auto', 'required' or a named function", value)


def _refuse_chat_features(data: Mapping[str, Any]) -> None:
    if data.get("functions") is not None:
        raise _unsupported("functions", "the deprecated 'functions' (use 'tools')")
    function_call = data.get("function_call")
    if function_call not in (None, "none", "auto"):
        raise _unsupported("function_call", "function calling")
    if data.get("audio") is not None:
        raise _unsupported("audio", "audio output")
    modalities = data.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise _unsupported("modalities", "output modalities other than text")


# Choices one request may ask for (n x prompts): each is a generation; this bounds what one costs.
MAX_CHOICES = 128
# Alternatives per token: OpenAI's cap for chat `top_logprobs` is 20; completions' legacy `logprobs` is 5,
# which vLLM (and this agent) extend to 20.
MAX_TOP_LOGPROBS = 20


def _chat_logprobs(data: Mapping[str, Any]) -> int | None:
    top = _integer(data, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if not _boolean(data, "logprobs"):
        if top is not None:
            raise InvalidRequest(
                "'top_logprobs' needs 'logprobs' set to true.", param="top_logprobs", code="invalid_value"
            )
        return None
    return top or 0


# A JSON schema larger than this is refused before it reaches the grammar compiler.
MAX_SCHEMA_BYTES = 64 * 1024


def _response_format(data: Mapping[str, Any]) -> ResponseFormat | None:
    """`response_format`: `text` (None), `json_object`, or `json_schema` with its `schema`."""
    value = data.get("response_format")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _invalid_type("response_format", "an object", value)
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat(type="json_object", param="response_format")
    if kind != "json_schema":
        raise InvalidRequest(
            f"Invalid value for 'response_format.type': {kind!r:.40}. Supported values are: 'text', "
            "'json_object' and 'json_schema'.",
            param="response_format.type",
            code="invalid_value",
        )
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        if spec is None:
            raise InvalidRequest(
                "Missing required parameter: 'response_format.json_schema'.",
                param="response_format.json_schema",
                code="missing_required_parameter",
            )
        raise _invalid_type("response_format.json_schema", "an object", spec)
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequest(
            "'response_format.json_schema.name' is required (a string).",
            param="response_format.json_schema.name",
            code="missing_required_parameter" if name is None else "invalid_value",
        )
    _boolean(spec, "strict", "response_format.json_schema.strict")
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise _invalid_type("response_format.json_schema.schema", "an object (a JSON schema)", schema)
    if len(orjson.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise InvalidRequest(
            f"'response_format.json_schema.schema' is larger than {MAX_SCHEMA_BYTES} bytes.",
            param="response_format.json_schema.schema",
            code="invalid_value",
        )
    return ResponseFormat(type="json_schema", schema=schema, param="response_format.json_schema.schema")


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    """Parse and validate a `POST /v1/chat/completions` body."""
    data = _decode(body)
    model = _model(data)
    messages = _messages(data)
    _refuse_chat_features(data)
    tools = _tools(data)
    sampling = _sampling(data)
    stream, include_usage = _streaming(data)
    user = _common(data)
    return ChatCompletionRequest(
        model=model,
        messages=messages,
        sampling=sampling,
        stream=stream,
        include_usage=include_usage,
        user=user,
        n=_integer(data, "n", 1, MAX_CHOICES) or 1,
        logprobs=_chat_logprobs(data),
        response_format=_response_format(data),
        tools=tools,
        tool_choice=_tool_choice(data, tools),
        parallel_tool_calls=_boolean(data, "parallel_tool_calls") is not False,
    )


def _token_ids(value: list[Any], param: str) -> tuple[int, ...]:
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= _MAX_TOKEN_ID:
            raise _invalid_type(f"{param}[{i}]", "a token id (a non-negative integer)", v)
    return tuple(value)


def _prompts(data: Mapping[str, Any]) -> tuple[PromptInput, ...]:
    """The prompts: a string, a list of strings, a list of token ids, or a list of token-id lists.
    `null` is allowed (OpenAI's spec: nullable, "as if from the beginning of a new document"): an empty
    prompt, which the engines start from the beginning-of-sequence token."""
    if "prompt" in data and data["prompt"] is None:
        return ("",)
    value = data.get("prompt")
    if value is None:
        raise InvalidRequest(
            "Missing required parameter: 'prompt'.", param="prompt", code="missing_required_parameter"
        )
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not value:
        raise _invalid_type("prompt", "a string, an array of strings or an array of token ids", value)
    if len(value) > MAX_CHOICES:
        raise InvalidRequest(
            f"'prompt' may hold at most {MAX_CHOICES} prompts.", param="prompt", code="invalid_value"
        )
    if all(isinstance(v, str) for v in value):
        return tuple(value)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return (_token_ids(value, "prompt"),)
    out: list[PromptInput] = []
    for i, item in enumerate(value):
        if not isinstance(item, list) or not item:
            raise _invalid_type(f"prompt[{i}]", "a non-empty array of token ids", item)
        out.append(_token_ids(item, f"prompt[{i}]"))
    return tuple(out)


def parse_completion_request(body: bytes) -> CompletionRequest:
    """Parse and validate a `POST /v1/completions` body."""
    data = _decode(body)
    model = _model(data)
    prompts = _prompts(data)
    echo = bool(_boolean(data, "echo"))
    logprobs = _integer(data, "logprobs", 0, MAX_TOP_LOGPROBS)
    suffix = _optional_str(data, "suffix")
    if suffix is not None and (echo or any(not isinstance(p, str) for p in prompts)):
        raise InvalidRequest(
            "'suffix' (fill in the middle) takes text prompts and no 'echo'.",
            param="suffix",
            code="invalid_value",
        )
    n = _integer(data, "n", 1, MAX_CHOICES) or 1
    best_of = _integer(data, "best_of", 0, 20)
    if best_of is not None and best_of > n:
        raise _unsupported("best_of", "best_of greater than n")
    if n * len(prompts) > MAX_CHOICES:
        raise InvalidRequest(
            f"'n' times the number of prompts may be at most {MAX_CHOICES}.", param="n", code="invalid_value"
        )
    sampling = _sampling(data)
    stream, include_usage = _streaming(data)
    user = _common(data)
    first = prompts[0]
    return CompletionRequest(
        model=model,
        prompt=first if isinstance(first, str) else "",
        prompts=prompts if len(prompts) > 1 or not isinstance(first, str) else (),
        sampling=sampling,
        stream=stream,
        include_usage=include_usage,
        user=user,
        n=n,
        logprobs=logprobs,
        echo=echo,
        suffix=suffix,
    )


# --------------------------------------------------------------------------------------------------
# Responses


def new_chat_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def new_completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def _usage(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


# Identifies the serving backend's configuration, as OpenAI's `system_fingerprint` does.
SYSTEM_FINGERPRINT: Final = "fp_helexa"


def _response(
    object_type: str,
    *,
    id: str,
    model: str,
    created: int,
    choices: list[dict[str, Any]],
    usage: Usage | None = None,
    usage_null: bool = False,
) -> bytes:
    """The envelope every completion object and chunk shares; `usage` only where the object carries it
    (`usage_null`: a chunk of a stream that will end with a usage chunk says `"usage": null`, as
    OpenAI's do)."""
    body: dict[str, Any] = {
        "id": id,
        "object": object_type,
        "created": created,
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": choices,
    }
    if usage is not None:
        body["usage"] = _usage(usage)
    elif usage_null:
        body["usage"] = None
    return orjson.dumps(body)


# The engine's finish reasons, plus "tool_calls" when the answer was calls.
WireFinish = Literal["stop", "length", "tool_calls"]


@dataclass(frozen=True, kw_only=True, slots=True)
class ChoiceOutput:
    """One finished choice of a non-streamed response; `logprobs` already in the route's shape."""

    index: int
    text: str
    finish_reason: WireFinish
    logprobs: dict[str, Any] | None = None
    tool_calls: tuple[ToolCall, ...] = ()


def tool_call_object(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _logprob(value: float) -> float | None:
    return None if math.isnan(value) else value


def chat_logprobs(entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """A chat choice's `logprobs`: `{"content": [{token, logprob, bytes, top_logprobs}], "refusal"}`."""
    return {
        "content": [
            {
                "token": e.text,
                "logprob": e.logprob,
                "bytes": list(e.text.encode()),
                "top_logprobs": [
                    {"token": text, "logprob": lp, "bytes": list(text.encode())} for _, text, lp in e.top
                ],
            }
            for e in entries
        ],
        "refusal": None,
    }


def completion_logprobs(entries: Sequence[TokenLogprob], *, offset: int = 0) -> dict[str, Any]:
    """A completion choice's legacy `logprobs`: parallel lists of tokens, their logprobs (None for an
    echoed prompt's first token, which nothing predicts), the top alternatives and text offsets
    (characters from the start of the choice's text, counting from `offset`)."""
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for e in entries:
        tokens.append(e.text)
        value = _logprob(e.logprob)
        values.append(value)
        tops.append(None if value is None else {text: lp for _, text, lp in e.top})
        offsets.append(offset)
        offset += len(e.text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _text_choice(
    text: str, finish_reason: WireFinish | None, *, index: int = 0, logprobs: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def _chat_choice(choice: ChoiceOutput) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": choice.text, "refusal": None}
    if choice.tool_calls:
        message["content"] = choice.text or None
        message["tool_calls"] = [tool_call_object(c) for c in choice.tool_calls]
    return {
        "index": choice.index,
        "message": message,
        "logprobs": choice.logprobs,
        "finish_reason": choice.finish_reason,
    }


def chat_completion(
    *,
    id: str,
    model: str,
    created: int,
    usage: Usage,
    text: str = "",
    finish_reason: FinishReason = "stop",
    choices: Sequence[ChoiceOutput] | None = None,
) -> bytes:
    """A non-streamed `chat.completion` object: one choice (`text`, `finish_reason`) or `choices`."""
    outs = choices if choices is not None else [ChoiceOutput(index=0, text=text, finish_reason=finish_reason)]
    body = [_chat_choice(c) for c in outs]
    return _response("chat.completion", id=id, model=model, created=created, choices=body, usage=usage)


def chat_chunk(
    *,
    id: str,
    model: str,
    created: int,
    content: str | None = None,
    role: bool = False,
    finish_reason: WireFinish | None = None,
    index: int = 0,
    logprobs: dict[str, Any] | None = None,
    tool_call: tuple[int, ToolCall] | None = None,
    usage_null: bool = False,
) -> bytes:
    """One `chat.completion.chunk`: `role=True` in the first chunk, content deltas or a tool call (its
    position among the choice's calls, and the call, arguments whole), then a chunk with `finish_reason`
    (and an empty delta)."""
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    if content is not None:
        delta["content"] = content
    if tool_call is not None:
        delta["tool_calls"] = [{"index": tool_call[0], **tool_call_object(tool_call[1])}]
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return _response(
        "chat.completion.chunk", id=id, model=model, created=created, choices=[choice], usage_null=usage_null
    )


def chat_usage_chunk(*, id: str, model: str, created: int, usage: Usage) -> bytes:
    """The extra chunk `stream_options.include_usage` asks for: `choices: []` and the usage."""
    return _response("chat.completion.chunk", id=id, model=model, created=created, choices=[], usage=usage)


def text_completion(
    *,
    id: str,
    model: str,
    created: int,
    usage: Usage,
    text: str = "",
    finish_reason: FinishReason = "stop",
    choices: Sequence[ChoiceOutput] | None = None,
) -> bytes:
    """A non-streamed `text_completion` object: one choice (`text`, `finish_reason`) or `choices`."""
    outs = choices if choices is not None else [ChoiceOutput(index=0, text=text, finish_reason=finish_reason)]
    body = [_text_choice(c.text, c.finish_reason, index=c.index, logprobs=c.logprobs) for c in outs]
    return _response("text_completion", id=id, model=model, created=created, choices=body, usage=usage)


def completion_chunk(
    *,
    id: str,
    model: str,
    created: int,
    text: str,
    finish_reason: WireFinish | None = None,
    index: int = 0,
    logprobs: dict[str, Any] | None = None,
    usage_null: bool = False,
) -> bytes:
    """One streamed `text_completion` chunk (the same shape as the full object, minus usage)."""
    choices = [_text_choice(text, finish_reason, index=index, logprobs=logprobs)]
    return _response(
        "text_completion", id=id, model=model, created=created, choices=choices, usage_null=usage_null
    )


def completion_usage_chunk(*, id: str, model: str, created: int, usage: Usage) -> bytes:
    """The `include_usage` chunk of a completion stream: `choices: []` and the usage."""
    return _response("text_completion", id=id, model=model, created=created, choices=[], usage=usage)


def model_object(listing: ModelListing) -> dict[str, object]:
    """One model as `GET /v1/models` shows it: OpenAI's fields plus where it runs."""
    return {
        "id": listing.id,
        "object": "model",
        "created": listing.created,
        "owned_by": listing.owned_by,
        "status": listing.status,
        "loaded": listing.loaded,
        "feasible_on": list(listing.feasible_on),
        "locations": [
            {
                "node": loc.node_name,
                "node_id": loc.node,
                "status": loc.status,
                "memory_mb": loc.memory_mb,
                "in_flight": loc.in_flight,
            }
            for loc in listing.locations
        ],
        "aliases": list(listing.aliases),
    }


def model_json(listing: ModelListing) -> bytes:
    return orjson.dumps(model_object(listing))


def model_list_json(listings: Sequence[ModelListing]) -> bytes:
    return orjson.dumps({"object": "list", "data": [model_object(listing) for listing in listings]})


# --------------------------------------------------------------------------------------------------
# The body and field validators other wire modules share (`mesh.server.responses_wire`); each error
# names its field.

decode_body = _decode
model_field = _model
number_field = _number
integer_field = _integer
boolean_field = _boolean
optional_str_field = _optional_str
invalid_type = _invalid_type
unsupported = _unsupported
common_fields = _common  # `metadata` checked, `user` returned
