"""Running the step graph on a device: a step's inputs go up in one copy, and decode
steps replay CUDA graphs.

On a GPU, the step's integer inputs are packed on the host into one pinned int64 buffer
and copied to the device at once; the step graph's views and casts of them run on the
device. A decode step (one token per sequence) of at most the largest captured batch
size is padded to the next captured size and replayed from a CUDA graph captured over a
static input buffer, one graph per size, sharing one memory pool (captured on first use,
or all at start with ``capture_all``). Padded sequences have one token at position 0,
a context of 1 and slot -1: they attend only to themselves and write nothing to the
cache. Other steps (prefills, chunks, mixed) run eagerly; given ``max_tokens``, their
token count is padded up to a bucket (``token_bucket``) with rows that belong to no
sequence: attention neither reads nor writes them, and no logits are taken from them.

A tensor-parallel engine's ranks replay their graphs together (``GraphPeers``): rank 0
tells the other ranks to capture each size with it (every rank captures its own executor,
its collectives inside), and before each replay it broadcasts the packed, padded inputs
into their staging buffers, which are laid out as its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple, Protocol

import numpy as np
import torch

from .batch import SequenceStep, step_inputs

Step = Callable[..., list[torch.Tensor]]

# The step graph's integer inputs, in packing order, with their dtypes.
INPUTS = (("ids", torch.int64), ("positions", torch.int64), ("slot_mapping", torch.int64),
          ("query_start", torch.int32), ("context_lens", torch.int32), ("block_tables", torch.int32),
          ("logits_indices", torch.int64))


class GraphPeers(Protocol):
    """The other ranks of a tensor-parallel engine, as rank 0's runner drives their graphs."""

    local_step: Step  # this rank's own executor: what its graphs capture

    def capture(self, size: int) -> None:
        """Have every other rank capture its graph of ``size`` sequences, as this one does now."""

    def replay(self, size: int, staged: torch.Tensor) -> None:
        """Broadcast ``staged`` (the start of this rank's staging buffer) into the other
        ranks' staging buffers, and have them replay their graphs of ``size``."""


class ModelRunner:
    """Runs steps of ``step`` over ``caches`` on ``device``; replays CUDA graphs for
    decode steps of up to ``graph_sizes[-1]`` sequences (none on the CPU or when empty),
    together with ``peers``' when given."""

    def __init__(self, step: Step, caches: Mapping[str, torch.Tensor], device: torch.device, block_size: int,
                 max_blocks: int, graph_sizes: Sequence[int] = (), max_tokens: int | None = None,
                 peers: GraphPeers | None = None):
        self.step = step
        self.peers = peers
        self.max_tokens = max_tokens
        self.caches = dict(caches)
        self.device = device
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.graph_sizes = tuple(sorted(graph_sizes)) if device.type == "cuda" else ()
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        if self.graph_sizes:
            largest = _layout(self.graph_sizes[-1], max_blocks)[-1][1] + 2 * self.graph_sizes[-1]  # and a feed
            self._staging = torch.zeros(largest, dtype=torch.int64, device=device)

    def run(self, steps: Sequence[SequenceStep], sampling: Sequence[int], feed: Feed | None = None) -> torch.Tensor:
        """Logits [sum(sampling), vocab] of one step: of the last ``sampling[i]`` tokens of
        sequence i (1 for a sequence that samples; more for one that scores its prompt);
        ``feed`` fills in the input tokens that the previous step is still sampling, on the device."""
        inputs = step_inputs(steps, self.block_size, sampling=sampling)
        index = torch.tensor(feed.dst + feed.src if feed else [], dtype=torch.int64)
        with torch.inference_mode():
            if self.graph_sizes and len(inputs["ids"]) == len(steps) <= self.graph_sizes[-1]:
                return self._replay(inputs, index, feed)
            if self.max_tokens and len(inputs["ids"]) > len(steps):
                inputs = pad_tokens(inputs, token_bucket(len(inputs["ids"]), self.max_tokens))
            inputs = self._upload({**inputs, "feed": index})
            if feed:
                _fill(inputs["ids"], inputs["feed"], feed.tokens)
            return self.step(**{name: inputs[name] for name, _ in INPUTS}, **self.caches)[0]

    def capture_all(self) -> None:
        """Capture the graph of every size now, largest first (they share one pool)."""
        for size in reversed(self.graph_sizes):
            self._graph(size)

    def warm_up(self, tokens: int, max_seq_len: int) -> None:
        """Run one prefill step of ``tokens`` tokens (in sequences of at most
        ``max_seq_len``) that writes no cache slot (every slot -1), so that kernels are
        compiled and the largest activations allocated before the first request. Needs a
        backend whose attention skips negative slots (the CUDA backend's)."""
        lengths = [min(max_seq_len, tokens - start) for start in range(0, tokens, max_seq_len)]
        step = step_inputs([SequenceStep([0] * n, 0, [0] * -(-n // self.block_size)) for n in lengths],
                           self.block_size)
        step["slot_mapping"].fill_(-1)
        with torch.inference_mode():
            self.step(**self._upload(step), **self.caches)

    @property
    def captured_sizes(self) -> tuple[int, ...]:
        return tuple(sorted(self._graphs))

    @property
    def staging(self) -> torch.Tensor:
        """The device buffer the graphs read their inputs from (see ``_layout``)."""
        return self._staging

    def capture(self, size: int) -> None:
        """Capture the graph of ``size`` sequences now, if it is not yet (a peer rank's side
        of ``GraphPeers.capture``)."""
        self._graph(size)

    def replay_staged(self, size: int) -> None:
        """Replay the graph of ``size`` over what the staging buffer holds (a peer rank's
        side of ``GraphPeers.replay``; it was captured when rank 0 said)."""
        self._graphs[size][0].replay()

    def _upload(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.device.type != "cuda":
            return {name: t.to(self.device) for name, t in inputs.items()}
        names = [(name, inputs[name].dtype) for name in inputs]
        host = torch.cat([inputs[name].flatten().long() for name, _ in names]).pin_memory()
        packed = host.to(self.device, non_blocking=True)
        views, at = {}, 0
        for name, dtype in names:
            count = inputs[name].numel()
            views[name] = packed[at:at + count].view(inputs[name].shape).to(dtype)
            at += count
        return views

    def _replay(self, inputs: dict[str, torch.Tensor], index: torch.Tensor, feed: Feed | None) -> torch.Tensor:
        count, logits = len(inputs["ids"]), len(inputs["logits_indices"])
        size = next(s for s in self.graph_sizes if s >= count)
        graph, out = self._graph(size)
        used = _layout(size, self.max_blocks)[-1][1]
        # A fresh pinned buffer each step: the previous step's copy from its own may still be
        # queued (steps launch ahead), and torch reuses a pinned block only after its copy ran.
        host = torch.empty(used + len(index), dtype=torch.int64, pin_memory=True)
        _pad_into(host, inputs, size, self.max_blocks)
        host[used:] = index
        self._staging[:len(host)].copy_(host, non_blocking=True)
        if feed:
            _fill(self._staging[:size], self._staging[used:used + len(index)], feed.tokens)
        if self.peers:
            self.peers.replay(size, self._staging[:used])
        graph.replay()
        return out[:logits]

    def _graph(self, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        if size not in self._graphs:
            inputs = {}
            for (name, dtype), (start, end) in zip(INPUTS, _layout(size, self.max_blocks)):
                view = self._staging[start:end]
                inputs[name] = view.view(size, self.max_blocks) if name == "block_tables" else view
            empty = {name: torch.zeros((0, self.max_blocks) if name == "block_tables" else 0, dtype=torch.int64)
                     for name, _ in INPUTS}
            padding = torch.empty(_layout(size, self.max_blocks)[-1][1], dtype=torch.int64)
            _pad_into(padding, empty, size, self.max_blocks)  # all padding: the warm-up writes no cache slot
            self._staging[:len(padding)].copy_(padding)
            if self.peers:
                self.peers.capture(size)  # they run the same warm-up and capture: their collectives meet ours
            step = self.peers.local_step if self.peers else self.step

            def body() -> torch.Tensor:
                return step(**{n: inputs[n].to(dtype) for n, dtype in INPUTS}, **self.caches)[0]

            with torch.inference_mode():
                torch.cuda.synchronize(self.device)
                stream = torch.cuda.Stream(self.device)
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):
                    body()  # compiles and loads every kernel outside the capture
                torch.cuda.current_stream(self.device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool):
                    out = body()
                self._pool = graph.pool()
            self._graphs[size] = (graph, out)
        return self._graphs[size]


def token_bucket(tokens: int, limit: int) -> int:
    """The token count an eager step of ``tokens`` is padded to: the next multiple of an
    eighth of its power of two (of 64 at least), at most ``limit``. cuBLAS chooses a GEMM's
    algorithm on the host the first time it meets a row count (about 4.5 ms for a layer
    of the Llama-3.1-8B shape on an H100); buckets bound the row counts it meets, for at
    most 12.5% more rows from 512 tokens on (fewer tokens take a multiple of 64)."""
    grain = max(64, 1 << max(tokens.bit_length() - 4, 0))
    return min(-(-tokens // grain) * grain, max(limit, tokens))


def pad_tokens(inputs: dict[str, torch.Tensor], total: int) -> dict[str, torch.Tensor]:
    """``inputs`` with ``total`` tokens: the rows added hold token 0 at position 0 and
    slot -1 and are in no sequence (``query_start`` still ends at the real tokens)."""
    extra = total - len(inputs["ids"])
    if extra <= 0:
        return inputs
    pads = {"ids": 0, "positions": 0, "slot_mapping": -1}
    return {name: torch.cat((t, t.new_full((extra,), pads[name]))) if name in pads else t
            for name, t in inputs.items()}


class Feed(NamedTuple):
    """Input tokens that the previous step is still sampling: step token ``dst[i]`` is
    row ``src[i]`` of ``tokens``, that step's sampled tokens on the device."""

    dst: list[int]
    src: list[int]
    tokens: torch.Tensor


def _fill(ids: torch.Tensor, index: torch.Tensor, tokens: torch.Tensor) -> None:
    """Write the fed tokens into ``ids`` on the device (``index``: the dst then the src rows)."""
    half = len(index) // 2
    ids.index_copy_(0, index[:half], tokens.index_select(0, index[half:]))


def _layout(size: int, width: int) -> list[tuple[int, int]]:
    """(start, end) in the packed buffer of each input of a decode step of ``size``."""
    counts = {"query_start": size + 1, "block_tables": size * width}
    spans, at = [], 0
    for name, _ in INPUTS:
        count = counts.get(name, size)
        spans.append((at, at + count))
        at += count
    return spans


def _pad_into(host: torch.Tensor, inputs: dict[str, torch.Tensor], size: int, width: int) -> None:
    """Pack a decode step's inputs, padded to ``size`` sequences and ``width`` blocks, into
    ``host`` (through numpy: torch's CPU ops would wake their thread pool for each)."""
    count = len(inputs["ids"])
    buffer = host.numpy()
    pads = {"ids": 0, "positions": 0, "slot_mapping": -1, "context_lens": 1, "logits_indices": 0}
    for (name, _), (start, end) in zip(INPUTS, _layout(size, width)):
        target = buffer[start:end]
        value = inputs[name].numpy()
        if name == "query_start":
            target[:] = np.arange(size + 1)
        elif name == "block_tables":
            table = target.reshape(size, width)
            table[:] = 0
            table[:count, :value.shape[1]] = value
        else:
            target[len(value):] = pads[name]
            target[:len(value)] = value
