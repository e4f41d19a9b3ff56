"""The running batch's KV cache: one `DynamicCache` whose rows are the sequences decoding together
(torch; imported by the inference thread, never at agent start).

Rows are left-padded to a common length `L` and carry an attention mask `[B, L]` (1 = a real token), as
`generate` does for batched prompts. A decode step feeds one token per row with `position_ids` = the
row's count of real tokens, so padding changes nothing but the amount of memory. A sequence joins after
its own prefill (its single-row cache is padded or pads the batch on the left, then both are stacked);
a sequence leaves by dropping its row, and columns that only padding still uses are cut off. Copies
happen only on joins and leaves: `DynamicLayer.update` already copies the whole cache every step.

Only plain `DynamicLayer` caches can be stacked this way (sliding-window, quantised or recurrent layers
cannot); `batchable` says whether a model's cache qualifies, and the engine decodes one sequence at a
time otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer


def batchable(cache: Any) -> bool:
    """Whether `cache` (after a prefill) is made of plain dynamic layers only."""
    layers: list[Any] = list(getattr(cache, "layers", None) or ())
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def kv_bytes_per_token(config: Any, dtype: Any) -> int:
    """Bytes of KV cache one token takes in every layer (keys and values)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = int(getattr(text, "num_hidden_layers", 1))
    heads = int(getattr(text, "num_attention_heads", 1))
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or int(text.hidden_size) // heads)
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * layers * kv_heads * head_dim * element


def _pad_left(t: Any, n: int) -> Any:
    """[B, H, L, D] → [B, H, n + L, D] with zeros in front."""
    if n <= 0:
        return t
    return torch.cat([t.new_zeros(t.shape[0], t.shape[1], n, t.shape[3]), t], dim=2)


class BatchCache:
    """The left-padded cache and attention mask of the sequences decoding together."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.cache: Any = None
        self.mask: Any = None  # [B, L] long

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])

    def join(self, cache: Any, length: int) -> None:
        """Add a prefilled single-row `cache` holding `length` tokens as the last row."""
        row_mask = torch.ones(1, length, dtype=torch.long, device=self.device)
        if self.cache is None:
            self.cache, self.mask = cache, row_mask
            return
        target = max(self.length, length)
        grow, pad = target - self.length, target - length
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, grow), _pad_left(theirs.keys, pad)], dim=0)
            mine.values = torch.cat([_pad_left(mine.values, grow), _pad_left(theirs.values, pad)], dim=0)
        zeros = torch.zeros
        self.mask = torch.cat(
            [
                torch.cat([zeros(self.rows, grow, dtype=torch.long, device=self.device), self.mask], dim=1),
                torch.cat([zeros(1, pad, dtype=torch.long, device=self.device), row_mask], dim=1),
            ],
            dim=0,
        )

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order); cut the leading columns no remaining row uses."""
        if not rows:
            self.cache = self.mask = None
            return
        if rows == list(range(self.rows)):
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.mask = self.mask.index_select(0, index)
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else 0
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:, :]
            layer.values = layer.values.index_select(0, index)[:, :, start:, :]

    def row_kv(self, row: int) -> list[tuple[Any, Any]]:
        """A copy of `row`'s real positions, per layer: keys and values [1, H, n, D]."""
        start = self.length - int(self.mask[row].sum())
        return [
            (
                layer.keys[row : row + 1, :, start:, :].clone(),
                layer.values[row : row + 1, :, start:, :].clone(),
            )
            for layer in self.cache.layers
        ]

    def step_inputs(self, tokens: list[int]) -> dict[str, Any]:
        """Model inputs for one decode step feeding `tokens` (one per row); extends the mask."""
        positions = self.mask.sum(dim=1, keepdim=True)
        self.mask = torch.cat(
            [self.mask, torch.ones(self.rows, 1, dtype=torch.long, device=self.device)], dim=1
        )
        return {
            "input_ids": torch.tensor(tokens, dtype=torch.long, device=self.device).unsqueeze(1),
            "attention_mask": self.mask,
            "position_ids": positions,
        }
