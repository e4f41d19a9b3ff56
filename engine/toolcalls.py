"""Tool calls in a model's output, per model family: which markup a chat template declares, and a
streaming parser that splits generated text into plain text and calls (pure; no torch).

Families (the markup their chat templates teach the model):

    hermes   <tool_call>{"name": ..., "arguments": {...}}</tool_call>      Hermes, Qwen 2/2.5/3, SmolLM
    mistral  [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]         Mistral
    llama3   {"name": ..., "parameters": {...}}  (or after <|python_tag|>) Llama 3.1+
    json     {"name": ..., "arguments": {...}}   a bare object             templates with tools but no markup

`family_of(template)` reads it from the template text. A template that renders no tools at all gets them
from `generic_tool_turns`: the tools described in a system turn that teaches the Hermes markup, earlier
calls and results written out in it, so any chat model can be offered tools (llama.cpp does the same for
templates it does not know). The parser recognises every family's markup
whatever the family (a model may answer in any of them), so a scripted fake engine can exercise them
all. Markup never reaches the client as text: text that might still turn into a marker is held back until
it cannot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

Family = Literal["hermes", "mistral", "llama3", "json"]

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_OPEN = "[TOOL_CALLS]"
PYTHON_TAG = "<|python_tag|>"
_MARKERS = (HERMES_OPEN, MISTRAL_OPEN, PYTHON_TAG)


def family_of(template: str | None) -> Family | None:
    """The tool-call family a chat template declares; None when it does not render tools at all."""
    if not template or "tools" not in template:
        return None
    if HERMES_OPEN in template:
        return "hermes"
    if MISTRAL_OPEN in template:
        return "mistral"
    if PYTHON_TAG in template or "ipython" in template or '"parameters"' in template:
        return "llama3"
    return "json"


@dataclass(frozen=True, slots=True)
class Text:
    text: str


@dataclass(frozen=True, slots=True)
class Call:
    name: str
    arguments: str  # JSON text of the arguments object


Piece = Text | Call


def _calls_from(value: object) -> list[Call] | None:
    """Calls from decoded JSON: an object with a name and arguments/parameters, or a list of them."""
    items = value if isinstance(value, list) else [value]
    calls: list[Call] = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        args = item.get("arguments", item.get("parameters", {}))
        text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False, separators=(",", ":"))
        calls.append(Call(name=item["name"], arguments=text))
    return calls or None


def _decode_all(text: str) -> object:
    """One JSON value, or several separated by whitespace or ';' (Llama's python_tag form) as a list."""
    text = text.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    decoder = json.JSONDecoder()
    values: list[object] = []
    i = 0
    while i < len(text):
        while i < len(text) and text[i] in " \t\r\n;":
            i += 1
        if i >= len(text):
            break
        value, i = decoder.raw_decode(text, i)  # raises on garbage: the caller falls back to text
        values.append(value)
    return values


class ToolCallParser:
    """Feed generated text as it comes; get `Text` and `Call` pieces in order.

    `bare_json`: the output may be a bare JSON call (the llama3 and json families): output that starts
    with `{` is held until the end and then read as a call if it is one.
    """

    def __init__(self, *, bare_json: bool = True) -> None:
        self._bare_json = bare_json
        self._buffer = ""
        self._mode: Literal["text", "hermes", "rest", "bare"] = "text"
        self._started = False  # any text emitted or consumed yet (a bare JSON call must come first)
        self._after_call = False  # whitespace right after a call is markup, not text

    def feed(self, text: str) -> list[Piece]:
        self._buffer += text
        return self._drain(final=False)

    def finish(self) -> list[Piece]:
        return self._drain(final=True)

    def _drain(self, *, final: bool) -> list[Piece]:
        out: list[Piece] = []
        while True:
            if self._mode == "text":
                if self._after_call:
                    self._buffer = self._buffer.lstrip()
                    if not self._buffer:
                        return out
                    self._after_call = False
                if not self._started and self._bare_json:
                    stripped = self._buffer.lstrip()
                    if stripped.startswith("{"):
                        self._mode = "bare"
                        continue
                    if not stripped and not final:
                        return out
                found = [(self._buffer.find(m), m) for m in _MARKERS if m in self._buffer]
                if found:
                    at, marker = min(found)
                    if at:
                        out.append(Text(self._buffer[:at]))
                    self._buffer = self._buffer[at + len(marker) :]
                    self._mode = "hermes" if marker == HERMES_OPEN else "rest"
                    self._started = True
                    continue
                keep = 0 if final else _held_back(self._buffer)
                emit = self._buffer[: len(self._buffer) - keep]
                if emit:
                    out.append(Text(emit))
                    self._started = True
                self._buffer = self._buffer[len(self._buffer) - keep :]
                return out
            if self._mode == "hermes":
                end = self._buffer.find(HERMES_CLOSE)
                if end < 0 and not final:
                    return out
                body = self._buffer if end < 0 else self._buffer[:end]
                self._buffer = "" if end < 0 else self._buffer[end + len(HERMES_CLOSE) :]
                out.extend(self._parse(body, HERMES_OPEN, "" if end < 0 else HERMES_CLOSE))
                self._mode = "text"
                self._after_call = True
                continue
            # "rest" (after [TOOL_CALLS] or <|python_tag|>) and "bare": everything to the end is calls.
            if not final:
                return out
            body, self._buffer = self._buffer, ""
            out.extend(self._parse(body, "" if self._mode == "bare" else MISTRAL_OPEN))
            self._mode = "text"
            return out

    def _parse(self, body: str, opened: str, closed: str = "") -> list[Piece]:
        try:
            calls = _calls_from(_decode_all(body))
        except (json.JSONDecodeError, ValueError):
            calls = None
        if calls is None:  # not a call after all: the model's text, as it wrote it
            text = opened + body + closed
            return [Text(text)] if text else []
        return list(calls)


def _held_back(text: str) -> int:
    """How many trailing characters of `text` could be the start of a marker (kept until they cannot)."""
    longest = 0
    for marker in _MARKERS:
        for n in range(min(len(marker) - 1, len(text)), 0, -1):
            if marker.startswith(text[-n:]):
                longest = max(longest, n)
                break
    return longest


def parse_all(text: str, *, bare_json: bool = True) -> tuple[str, list[Call]]:
    """A whole output's text (markup removed) and its calls."""
    parser = ToolCallParser(bare_json=bare_json)
    pieces = parser.feed(text) + parser.finish()
    return "".join(p.text for p in pieces if isinstance(p, Text)), [p for p in pieces if isinstance(p, Call)]


GENERIC_TOOLS_PROMPT = (
    "You may call functions to help with the user's request. The functions, as JSON schemas:\n"
    "<tools>\n{tools}\n</tools>\n"
    "To call a function, reply with one block per call and nothing else:\n"
    '<tool_call>\n{{"name": <function name>, "arguments": <arguments as a JSON object>}}\n</tool_call>\n'
    "The results come back in <tool_response></tool_response> blocks."
)


def generic_tool_turns(turns: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`turns` (chat-template turns) for a template that renders no tools: `GENERIC_TOOLS_PROMPT` joins
    the first system turn (or becomes one), an assistant turn's `tool_calls` become Hermes blocks in its
    content, and a `tool` turn becomes a user turn holding a <tool_response> block (templates that know no
    `tool` role may refuse it). Pure: returns new turns."""
    prompt = GENERIC_TOOLS_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
    out: list[dict[str, Any]] = []
    for turn in turns:
        if turn.get("tool_calls"):
            blocks = [
                f"{HERMES_OPEN}\n"
                + json.dumps(
                    {"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                    ensure_ascii=False,
                )
                + f"\n{HERMES_CLOSE}"
                for c in turn["tool_calls"]
            ]
            content = "\n".join([turn["content"], *blocks] if turn.get("content") else blocks)
            out.append({"role": "assistant", "content": content})
        elif turn.get("role") == "tool":
            out.append(
                {"role": "user", "content": f"<tool_response>\n{turn.get('content') or ''}\n</tool_response>"}
            )
        else:
            out.append(dict(turn))
    if out and out[0].get("role") == "system":
        out[0]["content"] = f"{out[0].get('content') or ''}\n\n{prompt}".lstrip()
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out
