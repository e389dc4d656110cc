"""The batched sampler: one row of logits per sequence that samples this step.

Penalties apply first (``logit_bias``, then repetition to prompt and output tokens,
presence and frequency to output tokens), then a row's stop tokens are forbidden until it has ``min_tokens``; greedy
rows take the argmax, the others temperature, top-k, top-p and min-p, then a draw.
Log-probabilities are of the model's distribution (after penalties, before temperature
and truncation), as vLLM reports them.

A step crosses between host and device twice, whatever the batch. The host writes what
the rows need into a few tables of float64 columns, which ``_upload`` sends in one copy;
``sampling_kernels`` does the work as batched tensor operations; the tokens and
log-probabilities come back packed in one tensor through ``_download``, which
``sample_async`` leaves under way so that the host can do other work meanwhile.

A sampled row's randomness is one uniform number, the n-th output of SplitMix64 seeded
with the request's seed after n output tokens: a seeded request samples the same tokens
whatever else shares its steps. Unseeded rows get a fresh seed from torch's default
generator at each step.
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Callable, Collection, Iterable
from collections.abc import Sequence as Seq
from typing import NamedTuple

import torch

from . import sampling_kernels as kernels
from .sequence import Sequence, TokenLogprobs

Results = list[tuple[int, TokenLogprobs | None]]
Table = list[array]  # columns of one length
_MASK64 = (1 << 64) - 1
_PENALTIES = ("bias", "repetition", "presence", "stops")


class Sampling(NamedTuple):
    """A step's sampling under way: the tokens on the device (one a row, for the next
    step to read there) and a function that waits for the results on the host."""

    tokens: torch.Tensor
    wait: Callable[[], Results]


def sample(logits: torch.Tensor, seqs: Seq[Sequence], eos: Seq[int] = ()) -> Results:
    """A token for each row of ``logits`` [len(seqs), vocab], with its log-probabilities
    when the row's request asks for them."""
    return sample_async(logits, seqs, eos).wait()


def sample_async(logits: torch.Tensor, seqs: Seq[Sequence], eos: Seq[int] = ()) -> Sampling:
    """``sample`` in two halves: launch the work on the device and the copy of its results
    to the host; the tokens on the device, and a function that waits for the results."""
    vocab = logits.shape[-1]
    host = _tables(seqs, eos, vocab)
    tables = _upload(host, logits.device)
    logits = _penalized(logits, tables)
    tokens = logits.argmax(-1)
    for name in ("unsorted", "sorted"):
        if name in tables:
            tokens = _draw(logits, tokens, host[name], tables[name], vocab)
    packed = [tokens.double()]
    top = max((s.params.logprobs for s in seqs if s.params.logprobs is not None), default=0)
    if "logprobs" in tables:
        packed.append(kernels.logprobs(logits, tables["logprobs"][0].long(), tokens, top).flatten())
    values = _download(torch.cat(packed))
    return Sampling(tokens, lambda: _results(values(), seqs, top))


def score(logits: torch.Tensor, tokens: Seq[int], tops: Seq[int]) -> list[TokenLogprobs]:
    """For each row of ``logits``, the log-probability of its token in ``tokens`` and the
    ``tops[row]`` most likely tokens' (log-softmax in float32 of the logits as they are, no
    penalty or bias): a prompt's log-probabilities. Waits for the device."""
    top = max(tops, default=0)
    rows = torch.arange(len(tokens), device=logits.device)
    values = kernels.logprobs(logits, rows, torch.tensor(tokens, device=logits.device), top).tolist()
    return [_token_logprobs(token, entry, k, top) for token, entry, k in zip(tokens, values, tops)]


# the host's tables: columns of float64, which holds token ids exactly ---------------------

def _tables(seqs: Seq[Sequence], eos: Seq[int], vocab: int) -> dict[str, Table]:
    """The step's tables by name, leaving out those that no row needs."""
    wanting_logprobs = [row for row, seq in enumerate(seqs) if seq.params.logprobs is not None]
    tables = {"bias": _bias(seqs), "repetition": _repetition(seqs), "presence": _presence(seqs),
              "stops": _stops(seqs, eos),
              **_draws(seqs, vocab), "logprobs": [array("d", wanting_logprobs)]}
    return {name: table for name, table in tables.items() if table[0]}


def _bias(seqs: Seq[Sequence]) -> Table:
    """(row, token, -bias) for each token of the rows' ``logit_bias`` (subtracted, as penalties are)."""
    rows = [row for row, seq in enumerate(seqs) if seq.params.logit_bias]
    biases = [seqs[row].params.logit_bias for row in rows]
    return [*_pairs(rows, [[token for token, _ in bias] for bias in biases]),
            _flat([[-amount for _, amount in bias] for bias in biases])]


def _repetition(seqs: Seq[Sequence]) -> Table:
    """(row, token, penalty) for each distinct prompt or output token of the rows with a
    repetition penalty."""
    rows = [row for row, seq in enumerate(seqs) if seq.params.repetition_penalty != 1.0]
    penalties = [seqs[row].params.repetition_penalty for row in rows]
    return _pairs(rows, [set(seqs[row].tokens) for row in rows], penalties)


def _presence(seqs: Seq[Sequence]) -> Table:
    """(row, token, presence + frequency * count) for each distinct output token of the rows
    with a presence or frequency penalty."""
    rows = [row for row, seq in enumerate(seqs) if seq.params.presence_penalty or seq.params.frequency_penalty]
    counts = [Counter(seqs[row].output_ids) for row in rows]
    amounts = [[p.presence_penalty + p.frequency_penalty * count for count in counted.values()]
               for p, counted in zip((seqs[row].params for row in rows), counts)]
    return [*_pairs(rows, counts), _flat(amounts)]


def _stops(seqs: Seq[Sequence], eos: Seq[int]) -> Table:
    """(row, token) for each stop token of the rows short of their ``min_tokens``."""
    rows = [row for row, seq in enumerate(seqs) if _generated(seq) < seq.params.min_tokens]
    stops = [set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos)) for p in (seqs[row].params for row in rows)]
    return _pairs(rows, stops)


def _draws(seqs: Seq[Sequence], vocab: int) -> dict[str, Table]:
    """(row, temperature, uniform, top_k, top_p, min_p) for each sampled row, in a table
    "sorted" for rows with top-k or top-p, which need a sort, and "unsorted" for the others."""
    unseeded = sum(not s.params.greedy and s.params.seed is None for s in seqs)
    fresh = iter(torch.randint(1 << 62, (unseeded,)).tolist())
    entries: dict[str, list[tuple[float, ...]]] = {"unsorted": [], "sorted": []}
    for row, seq in enumerate(seqs):
        p = seq.params
        if not p.greedy:
            seed = p.seed if p.seed is not None else next(fresh)
            top_k = p.top_k if 0 < p.top_k < vocab else vocab
            entries["sorted" if top_k < vocab or p.top_p < 1.0 else "unsorted"].append(
                (row, p.temperature, _uniform(seed, _generated(seq)), top_k, p.top_p, p.min_p))
    return {name: [array("d", column) for column in zip(*table)] for name, table in entries.items() if table}


def _pairs(rows: list[int], groups: list[Collection[int]], *per_row: list[float]) -> Table:
    """(row, token, *per_row) for each token of each row's group."""
    lengths = [len(group) for group in groups]
    return [_spread(rows, lengths), _flat(groups), *(_spread(values, lengths) for values in per_row)]


def _spread(values: list[float], lengths: list[int]) -> array:
    """Each value repeated ``length`` times."""
    spread = array("d")
    for value, length in zip(values, lengths):
        spread.extend(array("d", [value]) * length)
    return spread


def _flat(groups: list[Iterable[float]]) -> array:
    """The groups' numbers one after another, gathered in a list, which ``array`` converts
    several times faster than it takes other iterables (or than ``torch.tensor`` does)."""
    flat: list[float] = []
    for group in groups:
        flat.extend(group)
    return array("d", flat)


def _generated(seq: Sequence) -> int:
    return len(seq.tokens) - len(seq.prompt_ids)


def _uniform(seed: int, step: int) -> float:
    """The ``step``-th output of SplitMix64 seeded with ``seed``, as a float in [0, 1) of
    52 bits (so that ``u * mass`` rounds below ``mass``)."""
    z = (seed + (step + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return ((z ^ (z >> 31)) >> 12) / (1 << 52)


# crossing over ---------------------------------------------------------------------------

def _upload(tables: dict[str, Table], device: torch.device) -> dict[str, torch.Tensor]:
    """``tables`` on ``device`` in one host-to-device copy, each a [columns, entries] tensor."""
    if not tables:
        return {}
    buffer = array("d")
    for table in tables.values():
        for column in table:
            buffer.extend(column)
    host = torch.frombuffer(buffer, dtype=torch.float64)
    if device.type == "cuda":
        host = host.pin_memory()  # a pinned copy does not wait for the model's step to end
    shapes = [(len(table), len(table[0])) for table in tables.values()]
    parts = host.to(device, non_blocking=True).split([columns * entries for columns, entries in shapes])
    return {name: part.view(shape) for name, part, shape in zip(tables, parts, shapes)}


def _download(packed: torch.Tensor) -> Callable[[], list[float]]:
    """Start the step's one device-to-host copy; a function that waits for it."""
    if packed.device.type != "cuda":
        values = packed.tolist()
        return lambda: values
    host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
    host.copy_(packed, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def wait() -> list[float]:
        copied.synchronize()
        return host.tolist()
    return wait


def _results(values: list[float], seqs: Seq[Sequence], top: int) -> Results:
    """Unpack ``_download``'s values: a token per row, then an entry of ``1 + 2 * top``
    values for each row that wants log-probabilities."""
    tokens = [int(v) for v in values[:len(seqs)]]
    width = 1 + 2 * top
    entries = (values[start:start + width] for start in range(len(seqs), len(values), width))
    results = []
    for token, seq in zip(tokens, seqs):
        k = seq.params.logprobs
        results.append((token, None if k is None else _token_logprobs(token, next(entries), k, top)))
    return results


def _token_logprobs(token: int, entry: list[float], k: int, top: int) -> TokenLogprobs:
    """The first ``k`` of an entry's ``top`` most likely tokens; the entry holds the token's
    log-probability, then ``top`` ids, then their ``top`` log-probabilities."""
    return TokenLogprobs(token, entry[0], dict(zip(map(int, entry[1:1 + k]), entry[1 + top:1 + top + k])))


# on the device ---------------------------------------------------------------------------

def _penalized(logits: torch.Tensor, tables: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits after penalties and forbidden stop tokens: a float32 copy where any apply."""
    if not any(name in tables for name in _PENALTIES):
        return logits
    logits = logits.to(torch.float32, copy=True)
    if "bias" in tables:
        row, token, amount = tables["bias"]
        kernels.subtract(logits, row.long(), token.long(), amount.float())
    if "repetition" in tables:
        row, token, penalty = tables["repetition"]
        kernels.penalize_repetition(logits, row.long(), token.long(), penalty.float())
    if "presence" in tables:
        row, token, amount = tables["presence"]
        kernels.subtract(logits, row.long(), token.long(), amount.float())
    if "stops" in tables:
        row, token = tables["stops"]
        kernels.forbid(logits, row.long(), token.long())
    return logits


def _draw(logits: torch.Tensor, tokens: torch.Tensor, host: Table, table: torch.Tensor,
          vocab: int) -> torch.Tensor:
    """``tokens`` with the rows of a draw table replaced by their draws; ``kernels.draw``
    gets only the truncations that some row uses, which the table's ``host`` copy shows."""
    row, temperature, uniform, top_k, top_p, min_p = table[:, :, None]
    *_, top_ks, top_ps, min_ps = host
    truncations = {}
    if any(k < vocab for k in top_ks):
        truncations["top_k"] = top_k.long()
    if any(p < 1.0 for p in top_ps):
        truncations["top_p"] = top_p
    if any(p > 0.0 for p in min_ps):
        truncations["min_p"] = min_p.float()
    rows = row.squeeze(1).long()
    return tokens.index_copy(0, rows, kernels.draw(logits, rows, temperature.float(), uniform, **truncations))
