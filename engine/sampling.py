"""The per-request sampling pipeline, applied per sequence inside a batch (torch; imported by the
inference thread, never at agent start).

For a batch's logits `[B, V]` and each row's `SamplingParams`, in this order:

1. `logit_bias` (added), then the constrained-decoding mask (`TokenConstraint.mask`);
2. penalties over what the row has seen: `repetition_penalty` (prompt and output tokens; positive
   logits divided, negative multiplied, as HF and vLLM do), `frequency_penalty` (times the count of each
   output token) and `presence_penalty` (once per output token), both subtracted as OpenAI specifies;
3. greedy rows (`temperature == 0`, or so small that `logits / temperature` would overflow) take the
   argmax; the others are scaled by `1 / temperature`, cut by `top_k`, `top_p` and `min_p`, and sampled
   with the row's own `torch.Generator` (so a seed gives the same output whatever else is in the batch).

Rows that need nothing but greedy or plain sampling take vectorised paths; penalties keep a count of
each row's tokens only when that row asks for one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .base import SamplingParams

# Below this temperature sampling is argmax: `logits / T` overflows float32 long before T reaches 0
# (1e-38 gave NaN probabilities), and at 1e-4 the distribution is already one-hot for any real logits.
MIN_SAMPLING_TEMPERATURE = 1e-4


@dataclass(eq=False, kw_only=True)
class RowState:
    """What the pipeline keeps for one sequence: its parameters, generator and the tokens it has seen."""

    sampling: SamplingParams
    generator: Any  # torch.Generator, or None for greedy rows
    prompt_ids: Sequence[int] = ()
    # Counts of output tokens (frequency/presence) and the set of prompt+output tokens (repetition),
    # kept only when the row has such a penalty.
    counts: dict[int, int] = field(default_factory=dict)
    seen: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.sampling.repetition_penalty != 1.0:
            self.seen.update(int(t) for t in self.prompt_ids)

    @property
    def greedy(self) -> bool:
        return self.sampling.temperature < MIN_SAMPLING_TEMPERATURE

    @property
    def penalised(self) -> bool:
        s = self.sampling
        return s.presence_penalty != 0.0 or s.frequency_penalty != 0.0 or s.repetition_penalty != 1.0

    def accept(self, token: int) -> None:
        """Record the token chosen for this row (penalties, the constraint)."""
        s = self.sampling
        if s.presence_penalty != 0.0 or s.frequency_penalty != 0.0:
            self.counts[token] = self.counts.get(token, 0) + 1
        if s.repetition_penalty != 1.0:
            self.seen.add(token)
        if s.constraint is not None:
            s.constraint.accept(token)


def new_generator(device: str, seed: int | None) -> Any:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def _penalise(row: Any, state: RowState) -> None:
    """Apply the row's penalties to its logits (1-D, float32), in place."""
    s = state.sampling
    device = row.device
    if s.repetition_penalty != 1.0 and state.seen:
        ids = torch.tensor(sorted(state.seen), device=device, dtype=torch.long)
        picked = row.index_select(0, ids)
        picked = torch.where(picked > 0, picked / s.repetition_penalty, picked * s.repetition_penalty)
        row.index_copy_(0, ids, picked)
    if state.counts and (s.presence_penalty != 0.0 or s.frequency_penalty != 0.0):
        ids = torch.tensor(list(state.counts), device=device, dtype=torch.long)
        counts = torch.tensor(list(state.counts.values()), device=device, dtype=row.dtype)
        row.index_add_(0, ids, -(s.frequency_penalty * counts + s.presence_penalty))


def _cut(scores: Any, s: SamplingParams) -> Any:
    """`scores` (1-D, already divided by the temperature) with top-k, top-p and min-p applied."""
    if 0 < s.top_k < scores.numel():
        kth = torch.topk(scores, s.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if s.min_p > 0.0:
        probs = torch.softmax(scores, dim=-1)
        scores = scores.masked_fill(probs < s.min_p * probs.max(), -math.inf)
    if s.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop = (torch.cumsum(probs, dim=-1) - probs) > s.top_p
        sorted_scores = sorted_scores.masked_fill(drop, -math.inf)
        scores = torch.full_like(scores, -math.inf).scatter(0, order, sorted_scores)
    return scores


def sample(logits: Any, rows: Sequence[RowState]) -> list[int]:
    """The next token of every row of `logits` ([B, V], one row per state in `rows`)."""
    logits = logits.float().clone()  # never write into the caller's tensor (the prefix cache keeps it)
    for i, state in enumerate(rows):
        s = state.sampling
        if s.logit_bias:
            vocab = logits.shape[1]
            for token, bias in s.logit_bias:
                if 0 <= token < vocab:
                    logits[i, token] += bias
        if state.penalised:
            _penalise(logits[i], state)
        if s.constraint is not None:
            s.constraint.mask(logits[i])
    out = [0] * len(rows)
    greedy = [i for i, st in enumerate(rows) if st.greedy]
    if greedy:
        picks = torch.argmax(logits[greedy], dim=-1).tolist()
        for i, token in zip(greedy, picks, strict=True):
            out[i] = int(token)
    for i, state in enumerate(rows):
        if state.greedy:
            continue
        s = state.sampling
        scores = _cut(logits[i] / s.temperature, s)
        probs = torch.softmax(scores, dim=-1)
        if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0.0:
            # Everything masked or a non-finite score (a model's NaN): the best-scoring token, never a
            # crash on one request.
            out[i] = int(torch.argmax(torch.nan_to_num(logits[i], nan=-math.inf)).item())
            continue
        out[i] = int(torch.multinomial(probs, 1, generator=state.generator).item())
    return out
