"""Grammar-constrained decoding with llguidance: the `TokenConstraint` behind structured output.

Chosen by measurement (the note of issue 9 has the figures): llguidance compiles a JSON schema in about a
millisecond and computes a token mask in about 0.1 ms per token on the demo model's vocabulary, has no
dependencies of its own, and speaks JSON schema, regular expressions and Lark grammars (tool calls). xgrammar
pulls in triton and a TVM runtime on Linux; outlines-core builds a whole index per schema up front (8 ms for
the demo vocabulary, growing with vocabulary size and schema).

`compile_format(tokenizer, fmt)` turns a `ResponseFormat` into a factory of per-request constraints; a
schema llguidance cannot enforce raises `RequestError` naming the client's field. The mask is applied to the
row the sampler scores (`mask(logits)`), every chosen token is fed to the matcher (`accept`), and `done`
turns true once the grammar is complete (the generation then ends with "stop").

torch and llguidance are imported by the inference side only (never at agent start).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from typing import Any

import llguidance
import llguidance.hf
import torch

from .base import ResponseFormat, TokenConstraint, ToolSpec
from .errors import RequestError
from .toolcalls import HERMES_CLOSE, HERMES_OPEN, MISTRAL_OPEN, Family

# JSON output without runs of blank lines or tabs between tokens: a weak model that may emit whitespace
# forever under a flexible grammar cannot, and the output stays compact.
_JSON_OPTIONS = {"whitespace_flexible": False}

_BITS = torch.arange(32, dtype=torch.int32)
# Closing in time: with this few tokens left (or an eighth of the budget), tokens that close a string, an
# object or an array get this much more logit, and EOS once the grammar is complete. A weak model can
# otherwise fill a free-form string until `max_tokens` cuts the JSON off.
CLOSE_WITHIN_TOKENS = 24
CLOSING_BIAS = 25.0


class _Tokenizer:
    """llguidance's view of one model's tokenizer, and which tokens close something."""

    def __init__(self, hf_tokenizer: Any) -> None:
        self.ll = llguidance.hf.from_tokenizer(hf_tokenizer)
        size = self.ll.vocab_size
        texts = hf_tokenizer.convert_ids_to_tokens(list(range(min(size, len(hf_tokenizer)))))
        closers = torch.zeros(size, dtype=torch.bool)
        for i, piece in enumerate(texts):
            if isinstance(piece, str) and any(c in piece for c in '"}]'):
                closers[i] = True
        self.closers = closers
        eos = getattr(hf_tokenizer, "eos_token_id", None)
        self.eos = eos if isinstance(eos, int) else None


class Tokenizers:
    """Each model's `_Tokenizer`, built once per model on first use (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[int, _Tokenizer] = {}

    def of(self, hf_tokenizer: Any) -> _Tokenizer:
        key = id(hf_tokenizer)
        with self._lock:
            found = self._by_id.get(key)
            if found is None:
                found = self._by_id[key] = _Tokenizer(hf_tokenizer)
            return found


TOKENIZERS = Tokenizers()


class GrammarConstraint:
    """One request's matcher over a compiled grammar. Implements `TokenConstraint`."""

    def __init__(self, tokenizer: _Tokenizer, grammar: str) -> None:
        self._tokenizer = tokenizer
        self._matcher = llguidance.LLMatcher(tokenizer.ll, grammar)
        self._words = (tokenizer.ll.vocab_size + 31) // 32
        self._bitmask = torch.zeros(self._words, dtype=torch.int32)
        self._closing = False

    def remaining(self, tokens: int) -> None:
        self._closing = tokens <= CLOSE_WITHIN_TOKENS

    def mask(self, logits: Any) -> None:
        if self._matcher.is_stopped():
            return
        _fill(self._matcher, self._bitmask)
        vocab = logits.shape[-1]
        allowed = ((self._bitmask.unsqueeze(-1) >> _BITS) & 1).flatten()[:vocab].bool()
        if allowed.shape[0] < vocab:  # logits wider than the tokenizer (padded embeddings): never those
            allowed = torch.cat([allowed, allowed.new_zeros(vocab - allowed.shape[0])])
        allowed = allowed.to(logits.device)
        logits.masked_fill_(~allowed, -math.inf)
        if self._closing:
            closers = self._tokenizer.closers[:vocab].to(logits.device)
            if closers.shape[0] < vocab:
                closers = torch.cat([closers, closers.new_zeros(vocab - closers.shape[0])])
            logits.add_((closers & allowed).float() * CLOSING_BIAS)
            eos = self._tokenizer.eos
            if eos is not None and eos < vocab and bool(allowed[eos]):
                logits[eos] += 2 * CLOSING_BIAS

    def accept(self, token_id: int) -> None:
        if not self._matcher.is_stopped():
            self._matcher.consume_token(token_id)

    @property
    def done(self) -> bool:
        return bool(self._matcher.is_stopped())


def _fill(matcher: Any, bitmask: Any) -> None:
    import llguidance.torch as lt  # noqa: PLC0415 -- its helpers want a [1, words] tensor view

    lt.fill_next_token_bitmask(matcher, bitmask.unsqueeze(0), 0)


def grammar_of(fmt: ResponseFormat) -> str:
    """The llguidance grammar (JSON text) for `fmt`."""
    schema: dict[str, Any] = {"type": "object"} if fmt.type == "json_object" else dict(fmt.schema or {})
    schema["x-guidance"] = {**_JSON_OPTIONS, **(schema.get("x-guidance") or {})}
    return str(llguidance.LLMatcher.grammar_from_json_schema(schema))


def compile_format(hf_tokenizer: Any, fmt: ResponseFormat) -> Callable[[], TokenConstraint]:
    """Check `fmt` against the model's tokenizer; return a factory of fresh per-request constraints.

    Raises `RequestError` (param: the schema's place in the request) when llguidance cannot enforce it,
    with llguidance's own reason (it names the unsupported keyword)."""
    tokenizer = TOKENIZERS.of(hf_tokenizer)
    try:
        grammar = grammar_of(fmt)
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer.ll)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise RequestError(f"the schema cannot be enforced: {exc}", param=fmt.param) from exc
    # A warning means a keyword llguidance would ignore: the output could then break the schema, so it is
    # refused like an error.
    if failed or messages:
        reason = "; ".join(str(m) for m in messages) or "unsupported schema"
        raise RequestError(f"the schema cannot be enforced: {reason}", param=fmt.param)
    return lambda: GrammarConstraint(tokenizer, grammar)


def _call_schema(tool: ToolSpec, arguments_key: str) -> dict[str, Any]:
    parameters = tool.parameters or {"type": "object"}
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, arguments_key: parameters},
        "required": ["name", arguments_key],
        "additionalProperties": False,
    }


def tool_grammar(family: Family, tools: tuple[ToolSpec, ...], *, parallel: bool) -> str:
    """A Lark grammar (with embedded JSON schemas) whose every sentence is one call, or with `parallel`
    one or more, of `tools` in `family`'s markup, arguments valid under each function's parameters."""
    key = "parameters" if family == "llama3" else "arguments"
    options = [_call_schema(t, key) for t in tools]
    one: dict[str, Any] = options[0] if len(options) == 1 else {"oneOf": options}
    one = {**one, "x-guidance": dict(_JSON_OPTIONS)}
    if family == "mistral":
        array: dict[str, Any] = {
            "type": "array",
            "items": one,
            "minItems": 1,
            "x-guidance": dict(_JSON_OPTIONS),
        }
        if not parallel:
            array["maxItems"] = 1
        return f"start: {json.dumps(MISTRAL_OPEN)} calls\ncalls: %json {json.dumps(array)}\n"
    if family == "hermes":
        call = f"call: {json.dumps(HERMES_OPEN + chr(10))} obj {json.dumps(chr(10) + HERMES_CLOSE)}"
        start = 'start: call ("\\n" call)*' if parallel else "start: call"
        return f"{start}\n{call}\nobj: %json {json.dumps(one)}\n"
    return f"start: obj\nobj: %json {json.dumps(one)}\n"


def compile_tools(
    hf_tokenizer: Any, family: Family, tools: tuple[ToolSpec, ...], *, parallel: bool
) -> Callable[[], TokenConstraint]:
    """Like `compile_format`, for calls of `tools` (`tool_choice` "required" or a named function)."""
    tokenizer = TOKENIZERS.of(hf_tokenizer)
    try:
        grammar = str(llguidance.LLMatcher.grammar_from_lark(tool_grammar(family, tools, parallel=parallel)))
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer.ll)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise RequestError(f"the tools' parameters cannot be enforced: {exc}", param="tools") from exc
    if failed or messages:
        reason = "; ".join(str(m) for m in messages) or "unsupported schema"
        raise RequestError(f"the tools' parameters cannot be enforced: {reason}", param="tools")
    return lambda: GrammarConstraint(tokenizer, grammar)
