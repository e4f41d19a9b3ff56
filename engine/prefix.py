"""Prefix reuse: the KV of recently prefilled or finished sequences, for prompts that start the same way
(torch; imported by the inference thread, never at agent start).

Chat clients re-send the whole conversation every turn, agents re-send the same long system prompt, and
`n > 1` asks for several completions of one prompt. Each entry holds one sequence's keys and values
(a single row, no padding) with the token ids they stand for, and, for a prompt that was just
prefilled, the logits after its last token. A new prompt takes the entry sharing its longest prefix:
the whole prompt with logits needs no forward pass at all; otherwise the shared part is copied into
the new sequence's cache and only the rest is prefilled.

Tensors are shared, never written in place (`DynamicLayer.update` concatenates into new tensors), so
an entry stays valid while the batch that produced it moves on; a reuse copies the prefix once. The
cache is bounded in tokens and evicts the least recently used entry.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transformers import DynamicCache

# Shorter shared prefixes are not worth a lookup and a copy: recomputing a few tokens is as fast.
MIN_REUSE_TOKENS = 16


@dataclass(eq=False, kw_only=True)
class _Entry:
    ids: tuple[int, ...]
    kv: list[tuple[Any, Any]]  # per layer: keys, values [1, H, len(ids), D]
    logits: Any = None  # [1, V] after the last id (a prompt just prefilled), else None


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    """Up to `max_tokens` KV positions of recent sequences, least recently used evicted first."""

    def __init__(self, max_tokens: int, *, min_reuse: int = MIN_REUSE_TOKENS) -> None:
        self.max_tokens = max(0, max_tokens)
        self.min_reuse = min_reuse
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._tokens = 0
        self._next = 0
        self.hits = 0
        self.reused_tokens = 0

    @property
    def tokens(self) -> int:
        return self._tokens

    def store(self, ids: Sequence[int], kv: list[tuple[Any, Any]], logits: Any = None) -> None:
        """Remember `kv` (per layer, one row of exactly `len(ids)` positions) for `ids`."""
        if not ids or len(ids) > self.max_tokens or len(ids) < self.min_reuse:
            return
        key = tuple(ids)
        for k, entry in list(self._entries.items()):
            if entry.ids == key and (logits is None or entry.logits is not None):
                self._entries.move_to_end(k)  # already stored
                return
            if key[: len(entry.ids)] == entry.ids and (entry.logits is None or len(entry.ids) == len(key)):
                self._drop(k)  # the new entry covers this one
        while self._entries and self._tokens + len(key) > self.max_tokens:
            self._drop(next(iter(self._entries)))
        self._entries[self._next] = _Entry(ids=key, kv=kv, logits=logits)
        self._next += 1
        self._tokens += len(key)

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key)
        self._tokens -= len(entry.ids)

    def take(self, prompt: Sequence[int], config: Any, *, whole_only: bool = False) -> tuple[Any, int, Any]:
        """A cache for `prompt` holding its longest stored prefix: `(cache, positions, logits)`.

        `logits` is set only when the whole prompt was found with its logits (no forward needed);
        otherwise at most `len(prompt) - 1` positions are reused, so the caller feeds at least one
        token and gets logits. `(None, 0, None)` when nothing worth reusing is stored, or, with
        `whole_only`, when the whole prompt with its logits is not (a prompt about to be prefilled in a
        group with others gains more from that than from a partial reuse).
        """
        while self._entries and self._tokens > self.max_tokens:  # the budget shrank (or reuse is off)
            self._drop(next(iter(self._entries)))
        best: tuple[int, int] | None = None
        for k, entry in self._entries.items():
            n = _common(entry.ids, prompt)
            if best is None or n > best[1]:
                best = (k, n)
        if best is None or best[1] < self.min_reuse:
            return None, 0, None
        key, n = best
        entry = self._entries[key]
        self._entries.move_to_end(key)
        logits = None
        if n == len(prompt) == len(entry.ids) and entry.logits is not None:
            logits = entry.logits
        elif whole_only:
            return None, 0, None
        else:
            n = min(n, len(prompt) - 1)
            if n < self.min_reuse:
                return None, 0, None
        cache = DynamicCache(
            ddp_cache_data=[(k[:, :, :n, :], v[:, :, :n, :]) for k, v in entry.kv], config=config
        )
        self.hits += 1
        self.reused_tokens += n
        return cache, n, logits
