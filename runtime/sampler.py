"""The batched sampler: one row of logits per sequence that samples this step.

Penalties apply first (repetition to prompt and output tokens, presence and frequency to
output tokens), then temperature, top-k, top-p and min-p; greedy rows take the argmax.
Rows with a seed draw from their own generator, so a seeded request samples the same
tokens whatever else shares its steps. Log-probabilities are of the model's distribution
(after penalties, before temperature and truncation), as vLLM reports them.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from .sequence import Sequence, TokenLogprobs


def _penalize(logits: torch.Tensor, seqs: Seq[Sequence]) -> None:
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.tokens)), dtype=torch.long, device=logits.device)
            values = logits[row, seen]
            logits[row, seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and seq.output_ids:
            counts = torch.bincount(torch.tensor(seq.output_ids, device=logits.device), minlength=logits.shape[1])
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)


def _suppress_stops(logits: torch.Tensor, seqs: Seq[Sequence], eos: Seq[int]) -> None:
    for row, seq in enumerate(seqs):
        if len(seq.output_ids) < seq.params.min_tokens:
            stops = set(seq.params.stop_token_ids) | (set() if seq.params.ignore_eos else set(eos))
            if stops:
                logits[row, sorted(stops)] = float("-inf")


def _truncate(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    p = seq.params
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the more likely tokens
        drop = torch.zeros_like(probs, dtype=torch.bool)
        drop[order] = before >= p.top_p
        probs = probs.masked_fill(drop, 0.0)
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return probs


def sample(logits: torch.Tensor, seqs: Seq[Sequence], eos: Seq[int] = ()) -> list[tuple[int, TokenLogprobs | None]]:
    """A token for each row of ``logits`` [len(seqs), vocab], with its log-probabilities
    when the row's request asks for them."""
    logits = logits.float().clone()
    _penalize(logits, seqs)
    _suppress_stops(logits, seqs, eos)
    greedy = logits.argmax(-1).tolist()
    logprobs = logits.log_softmax(-1) if any(s.params.logprobs is not None for s in seqs) else None
    results = []
    for row, seq in enumerate(seqs):
        if seq.params.greedy:
            token = greedy[row]
        else:
            probs = _truncate(logits[row], seq).cpu()
            token = int(torch.multinomial(probs, 1, generator=seq.generator).item())
        info = None
        if logprobs is not None and seq.params.logprobs is not None:
            top = torch.topk(logprobs[row], seq.params.logprobs) if seq.params.logprobs else None
            info = TokenLogprobs(token, float(logprobs[row, token]),
                                 {} if top is None else dict(zip(top.indices.tolist(), top.values.tolist())))
        results.append((token, info))
    return results
