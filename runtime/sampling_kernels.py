"""The sampler's tensor work, batched over a step's rows on the logits' device.

Nothing here reads a value back to the host: row and token indices and per-row
parameters arrive as tensors on the logits' device (per-row columns shaped [rows, 1]),
and every function answers with tensors.

Draws invert the cumulative distribution: a row's uniform number ``u`` (made on the
host, see ``sampler``) picks the first token whose cumulative weight exceeds ``u`` times
the row's kept mass. A row thus needs one random number, not one per token, and top-k,
top-p and min-p, which each keep a prefix of the tokens sorted by probability, reduce to
counting how long that prefix is.
"""

from __future__ import annotations

import torch


def penalize_repetition(logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor,
                        penalty: torch.Tensor) -> None:
    """Divide the positive logits at (rows, tokens) by ``penalty`` and multiply the others,
    in place; each pair must appear once."""
    values = logits[rows, tokens]
    logits[rows, tokens] = torch.where(values > 0, values / penalty, values * penalty)


def subtract(logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor, amount: torch.Tensor) -> None:
    """Lower the logits at (rows, tokens) by ``amount``, in place; each pair must appear once."""
    logits[rows, tokens] = logits[rows, tokens] - amount


def forbid(logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor) -> None:
    """Set the logits at (rows, tokens) to -inf, in place."""
    logits[rows, tokens] = float("-inf")


def draw(logits: torch.Tensor, rows: torch.Tensor, temperature: torch.Tensor, uniform: torch.Tensor,
         top_k: torch.Tensor | None = None, top_p: torch.Tensor | None = None,
         min_p: torch.Tensor | None = None) -> torch.Tensor:
    """A token for each of ``rows`` drawn from softmax(logits / temperature), truncated to
    the ``top_k`` most likely tokens (ties with the k-th stay), then to the fewest whose
    mass reaches ``top_p``, then to those at least ``min_p`` times as likely as the most
    likely one. A truncation left out (None) costs nothing; without top-k and top-p the
    rows are not sorted."""
    scaled = logits.index_select(0, rows) / temperature
    if top_k is None and top_p is None:
        weights = (scaled - scaled.amax(-1, keepdim=True)).exp_()
        if min_p is not None:
            weights.masked_fill_(weights < min_p, 0.0)
        cdf = weights.cumsum(-1, dtype=torch.float64)
        return _pick(cdf, uniform, torch.full_like(rows[:, None], cdf.shape[-1])).squeeze(1)
    values, order = scaled.sort(dim=-1, descending=True, stable=True)
    weights = (values - values[:, :1]).exp_()
    cdf = weights.cumsum(-1, dtype=torch.float64)
    kept = torch.full_like(rows[:, None], cdf.shape[-1])
    if top_k is not None:
        kept = (values >= values.gather(1, top_k - 1)).sum(-1, keepdim=True)
    if top_p is not None:  # token i stays while the tokens before it hold less than top_p of the mass
        kept = torch.minimum(kept, torch.searchsorted(cdf, top_p * cdf.gather(1, kept - 1)) + 1)
    if min_p is not None:
        kept = torch.minimum(kept, (weights >= min_p).sum(-1, keepdim=True))
    return order.gather(1, _pick(cdf, uniform, kept)).squeeze(1)


def _pick(cdf: torch.Tensor, uniform: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose cumulative weight exceeds ``uniform`` times the mass
    of the first ``kept`` indices: index i with probability weight_i / mass."""
    index = torch.searchsorted(cdf, uniform * cdf.gather(1, kept - 1), right=True)
    return torch.minimum(index, kept - 1)  # a uniform below 1 never passes it; NaN logits could


def logprobs(logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor, top: int) -> torch.Tensor:
    """[len(rows), 1 + 2 * top] float64: for each of ``rows``, the log-probability of its
    token in ``tokens``, then the ids and log-probabilities of its ``top`` most likely tokens."""
    logprobs = torch.log_softmax(logits.index_select(0, rows), -1, dtype=torch.float32)
    columns = [logprobs.gather(1, tokens.index_select(0, rows)[:, None])]
    if top:
        best = logprobs.topk(top)
        columns += [best.indices, best.values]
    return torch.cat([column.double() for column in columns], 1)
