"""Disaggregated prefill and decode: prompts computed by prefill workers, their KV cache
sent to the serving process layer by layer while the rest of the prompt computes.

Rank 0 serves (scheduler, sampler, decode steps, its KV cache); ranks 1.. are prefill
workers, each with the whole model and a KV cache of the same blocks. When the
``DisaggregatedScheduler`` admits a waiting sequence it allocates the sequence's blocks
on rank 0 and sends a prefill worker all of its tokens but the last, with those block
numbers (``PrefillWorkers.dispatch``). The worker runs the prompt (in chunks of the
engine's token limit) over the same blocks of its own cache; the kernel that writes a
layer's cache is wrapped (``LayerSender``) so that as soon as it returns, that layer's
blocks go to rank 0 (``isend``) while the next layers compute. Rank 0 has posted the
receives when it dispatched; it goes on with its decode steps, and once every layer of a
sequence has arrived it copies the blocks into its cache and admits the sequence to the
running batch with its last prompt token left to compute: the step that computes it
samples the first token, on rank 0, as for any sequence. The worker also reports its
prefill time and how long the transfers ran past it (``PrefillStats``: the fraction of
the transfer hidden behind compute).

Prefix caching works as in one process on rank 0: a prompt's cached prefix blocks are
neither computed nor sent. ``prefill_cache.WorkerHoldings`` picks the worker whose cache
holds most of that prefix and the token the worker starts from; the worker sends only the
blocks after rank 0's prefix. A sequence that is preempted is prefilled again by a worker
(from its cached prefix, like any other).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..backends import kernels_for
from .batch import SequenceStep, step_inputs
from .block_manager import BlockManager
from .distributed import TIMEOUT_S, failure, receive_from_rank0, run_worker, spawn_workers, stop_workers
from .engine import Engine, load_engine
from .executor import load_executor
from .prefill_cache import WorkerHoldings
from .scheduler import Scheduled, Scheduler
from .sequence import Sequence, Status

REQUEST_TAG = 1 << 24  # a request's header and tokens; a request's KV messages are tagged below it
HEADER = 5  # a request's header: tokens, blocks, KV tag, first token's position, first block sent (tokens -1: stop)
_REQUESTS_IN_TAGS = 4096  # request numbers that the KV tags tell apart (far more than can be in flight)


@dataclass(frozen=True)
class PrefillStats:
    """The prefills so far: the workers' compute time, the time from each request's first
    KV send to its last send's completion, and the part of it after the compute ended; the
    KV blocks sent to rank 0 (those its prefix cache lacked) and the prompt tokens the
    workers computed."""

    requests: int
    prefill_s: float
    transfer_s: float
    exposed_s: float
    blocks: int = 0
    tokens: int = 0

    @property
    def hidden(self) -> float:
        """The fraction of the KV transfer that ran while the prompt was still computing."""
        return 1.0 - self.exposed_s / self.transfer_s if self.transfer_s else 0.0


class LayerSender:
    """A prefill worker's sends of one request's KV blocks to rank 0: each cache as soon
    as the kernel that writes it returns it (``wrap``), the rest at the end (``finish``)."""

    def __init__(self, caches: dict[str, torch.Tensor]):
        self.caches = list(caches.values())
        self._index = {id(t): i for i, t in enumerate(self.caches)}
        self._request: tuple[torch.Tensor, int] | None = None
        self._works: list = []
        self._sent: set[int] = set()
        self._first: float | None = None

    def arm(self, blocks: torch.Tensor, base_tag: int) -> None:
        """Send the caches that the next kernels write: ``blocks`` of each, tagged from ``base_tag``."""
        self._request = (blocks, base_tag)

    def wrap(self, kernel: Callable) -> Callable:
        """``kernel``, followed by the send of each armed cache among its results."""
        def call(*args, **kwargs):
            out = kernel(*args, **kwargs)
            if self._request is not None:
                for result in out if isinstance(out, tuple) else (out,):
                    if id(result) in self._index:
                        self._send(self._index[id(result)])
            return out

        return call

    def _send(self, index: int) -> None:
        if index in self._sent:
            return
        blocks, base = self._request
        self._first = self._first or time.perf_counter()
        self._sent.add(index)
        self._works.append(dist.isend(self.caches[index].index_select(0, blocks), 0, tag=base + index))

    def finish(self) -> tuple[float, float]:
        """Send the caches not sent yet (a backend whose kernels write caches out of
        place), wait for every send; (when the first send started, when the last ended)."""
        for index in range(len(self.caches)):
            self._send(index)
        for work in self._works:
            work.wait()
        first, done = self._first, time.perf_counter()
        self._request, self._works, self._sent, self._first = None, [], set(), None
        return first, done


def _layout(num_blocks: int, block_size: int) -> tuple[int, int]:
    layout = torch.tensor([num_blocks, block_size], dtype=torch.int64)
    dist.broadcast(layout, 0)
    return int(layout[0]), int(layout[1])


def serve_prefill(directory: str, rank: int, device: torch.device) -> None:
    """A prefill worker's loop: prefill each request rank 0 sends, sending each layer's KV
    blocks as soon as the layer is done, until rank 0 says stop."""
    engine = load_engine(directory)
    num_blocks, block_size = _layout(0, 0)
    caches = engine.cache_spec.allocate(num_blocks, block_size, device)
    sender = LayerSender(caches)
    writers = {v.producer.op for v in engine.graph.outputs[1:] if v.producer is not None}  # the caches' writers
    kernels = kernels_for(engine.info.backend, engine.info.target, engine.info.tuned_on, device, engine.kernel_configs)
    kernels = {op: sender.wrap(kernel) if op in writers else kernel for op, kernel in kernels.items()}
    step = load_executor(engine.executor_source, "executor.py", engine.weights(device), kernels)
    limit = engine.info.max_num_tokens
    with torch.inference_mode():
        while True:
            header = torch.empty(HEADER, dtype=torch.int64)
            receive_from_rank0(header, REQUEST_TAG)
            count, num_blocks, base, position, first_block = header.tolist()
            if count < 0:
                return
            payload = torch.empty(count + num_blocks, dtype=torch.int64)
            dist.recv(payload, 0, tag=REQUEST_TAG + 1)
            tokens, blocks = payload[:count].tolist(), payload[count:]
            start = time.perf_counter()
            for first in range(0, count, limit):
                chunk = tokens[first:first + limit]
                if first + len(chunk) == count:
                    sender.arm(blocks[first_block:], base)
                step(**step_inputs([SequenceStep(chunk, position + first, blocks.tolist())], block_size), **caches)
            computed = time.perf_counter()
            sent, done = sender.finish()
            times = torch.tensor([computed - start, done - sent, max(0.0, done - computed)], dtype=torch.float64)
            dist.send(times, 0, tag=base + len(caches))


@dataclass
class Transfer:
    """A sequence being prefilled by a worker: the blocks it sends, the tensors their KV
    and the timings arrive in, the sends and receives in flight, and the prompt tokens the
    worker computes."""

    seq: Sequence
    blocks: torch.Tensor
    staging: list[torch.Tensor]
    times: torch.Tensor
    works: list
    tokens: int


class PrefillWorkers:
    """Rank 0's side: the prefill worker processes, what their caches hold
    (``holdings``), and the transfers to rank 0's ``caches``."""

    def __init__(self, processes: list, scratch, caches: dict[str, torch.Tensor], holdings: WorkerHoldings):
        self.processes = processes
        self._scratch = scratch
        self.caches = list(caches.values())
        self.holdings = holdings
        self._requests = 0
        self._times = [0.0, 0.0, 0.0]  # prefill, transfer and exposed seconds of the landed requests
        self._counts = [0, 0, 0]  # their requests, blocks and tokens
        self._closed = False

    @classmethod
    def start(cls, engine: Engine, caches: dict[str, torch.Tensor], num_blocks: int, block_size: int,
              count: int, timeout_s: float = TIMEOUT_S) -> PrefillWorkers:
        """Spawn ``count`` prefill workers (CPU, gloo) and send them the cache layout."""
        if count < 1:
            raise ValueError(f"disaggregated serving needs at least one prefill worker, got {count}")
        processes, scratch = spawn_workers(engine, count + 1, "kiln.runtime.disaggregated", timeout_s)[1:]
        workers = cls(processes, scratch, caches, WorkerHoldings(count, block_size))
        workers._guard(lambda: _layout(num_blocks, block_size))
        return workers

    def dispatch(self, seq: Sequence) -> Transfer:
        """Send ``seq``'s tokens but the last, after what the chosen worker's cache holds
        (``WorkerHoldings.plan``), to that worker, and post the receives of the KV blocks
        that rank 0's prefix cache lacks."""
        plan = self.holdings.plan(seq)
        worker = 1 + plan.worker
        base = (self._requests % _REQUESTS_IN_TAGS) * (len(self.caches) + 1)
        self._requests += 1
        tokens = seq.tokens[plan.start:seq.num_tokens - 1]
        table = torch.tensor(seq.block_table, dtype=torch.int64)
        header = torch.tensor([len(tokens), len(table), base, plan.start, plan.first_block], dtype=torch.int64)
        blocks = table[plan.first_block:]

        def post() -> Transfer:
            works = [dist.isend(header, worker, tag=REQUEST_TAG),
                     dist.isend(torch.cat([torch.tensor(tokens, dtype=torch.int64), table]), worker,
                                tag=REQUEST_TAG + 1)]
            staging = [torch.empty((len(blocks), *c.shape[1:]), dtype=c.dtype) for c in self.caches]
            times = torch.empty(3, dtype=torch.float64)
            works += [dist.irecv(t, worker, tag=base + i) for i, t in enumerate([*staging, times])]
            return Transfer(seq, blocks, staging, times, works, len(tokens))

        return self._guard(post)

    def arrived(self, transfer: Transfer) -> bool:
        """Whether every message of ``transfer`` has gone or come."""
        return all(work.is_completed() for work in transfer.works)

    def land(self, transfer: Transfer) -> None:
        """Wait for ``transfer`` and copy its blocks into rank 0's caches."""
        self.wait(transfer)
        for cache, blocks in zip(self.caches, transfer.staging):
            cache.index_copy_(0, transfer.blocks.to(cache.device), blocks.to(cache.device))
        self._times = [a + float(b) for a, b in zip(self._times, transfer.times)]
        self._counts = [a + b for a, b in zip(self._counts, (1, len(transfer.blocks), transfer.tokens))]

    def wait(self, transfer: Transfer) -> None:
        """Wait for ``transfer``'s sends and receives (each once: a gloo receive waited
        for again waits for another message)."""
        def wait_all() -> None:
            while transfer.works:
                transfer.works.pop(0).wait()

        self._guard(wait_all)

    def stats(self) -> PrefillStats:
        """The prefills landed so far."""
        requests, blocks, tokens = self._counts
        return PrefillStats(requests, *self._times, blocks, tokens)

    def _guard(self, fn):
        try:
            return fn()
        except RuntimeError as exc:
            raise failure(self.processes, exc, "prefill") from exc

    def close(self) -> None:
        """Tell the workers to stop, wait for them, and leave the process group (once)."""
        if self._closed or not dist.is_initialized():
            return
        self._closed = True
        alive = all(p.poll() is None for p in self.processes)  # else the survivors are stuck or failing: killed
        try:
            if alive:
                for worker in range(1, len(self.processes) + 1):
                    dist.send(torch.tensor([-1] + [0] * (HEADER - 1)), worker, tag=REQUEST_TAG)
        finally:
            stop_workers(self.processes, self._scratch, 10.0 if alive else 0.0)


class DisaggregatedScheduler(Scheduler):
    """A scheduler whose waiting sequences are prefilled by the workers: admitted (blocks
    allocated, tokens dispatched) while there is room, they join the running batch when
    their KV blocks have arrived, their last prompt token left to compute."""

    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_tokens: int, workers: PrefillWorkers):
        super().__init__(blocks, max_num_seqs, max_num_tokens)
        self.workers = workers
        self.prefilling: list[Transfer] = []
        self._dropped: list[Transfer] = []  # of sequences that ended while prefilling: drained, not copied

    def has_work(self) -> bool:
        return super().has_work() or bool(self.prefilling)

    def schedule(self) -> list[Scheduled]:
        """Dispatch what waits, admit what arrived (waiting for the oldest prefill when
        nothing runs), then the running sequences' tokens, as ``Scheduler`` gives them."""
        self._dispatch()
        if self.prefilling and not self.running:
            self.workers.wait(self.prefilling[0])
        for transfer in [t for t in self.prefilling if self.workers.arrived(t)]:
            self.prefilling.remove(transfer)
            self.workers.land(transfer)
            transfer.seq.num_cached = transfer.seq.num_tokens - 1
            self.running.append(transfer.seq)
        self._dropped = [t for t in self._dropped if not self.workers.arrived(t)]
        queued, self.waiting = self.waiting, type(self.waiting)()
        batch = super().schedule()  # running sequences only; one it preempts lands in self.waiting
        self.waiting.extend(queued)
        return batch

    def _dispatch(self) -> None:
        while self.waiting and len(self.running) + len(self.prefilling) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.blocks.can_allocate(seq):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq)
            seq.status = Status.RUNNING
            if seq.num_cached == seq.num_tokens - 1:
                self.running.append(seq)  # nothing to prefill: one token, or all but the last cached
            else:
                self.prefilling.append(self.workers.dispatch(seq))

    def finish(self, seq: Sequence, reason: str) -> None:
        for transfer in [t for t in self.prefilling if t.seq is seq]:
            self.prefilling.remove(transfer)
            self._dropped.append(transfer)
        super().finish(seq, reason)


if __name__ == "__main__":
    run_worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], float(sys.argv[5]), serve_prefill)
