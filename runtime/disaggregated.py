"""Disaggregated prefill and decode: prompts computed by prefill workers, their KV cache
sent to the serving process layer by layer while the rest of the prompt computes.

Rank 0 serves (scheduler, sampler, decode steps, its KV cache); the prefill workers'
ranks follow the decode ranks, each worker with the whole model and a KV cache of the
same blocks. An engine of ``tp x pp`` ranks is served by its ranks (a ``WorkerGroup``)
and prefill workers of as many ranks each, laid out the same way: prefill rank ``r`` of a
worker (from its first rank) holds the same layers and heads as decode rank ``r`` and
sends its blocks there, and rank 0 tells the other decode ranks when to post their
receives and when to copy the blocks in (``kv_transfer.BlockReceiver``, over the ``KV``
command). When the
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
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .batch import SequenceStep, step_inputs
from .block_manager import BlockManager
from .distributed import (TIMEOUT_S, Groups, WorkerError, WorkerGroup, failure, rank_groups, run_worker, serve_rank,
                          spawn_workers, stage_runner, stop_workers)
from .engine import Engine, load_engine
from .engine_files import read_manifest
from .kv_cache import CacheLayout
from .kv_transfer import DROP, LAND, POST, BlockReceiver, LayerSender
from .pipeline import Layout
from .prefill_cache import WorkerHoldings
from .rank_commands import cache_layout, receive_from_rank0
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


def serve_prefill(directory: str, rank: int, device: torch.device, groups: Groups) -> None:
    """A prefill rank's loop: prefill each request rank 0 sends, sending each layer's KV
    blocks to the decode rank in its place (the same stage and tensor-parallel rank) as
    soon as the layer is done, until rank 0 says stop. ``groups`` are ``rank_groups``'."""
    tp, pp = (read_manifest(directory).get(key, 1) for key in ("tp", "pp"))
    local = rank % (tp * pp)  # the rank within the worker, and the decode rank in its place
    engine = load_engine(directory, rank=local)
    cache = cache_layout(None, device)
    block_size = cache.block_size
    sender = LayerSender({}, target=local)
    runner = stage_runner(engine, directory, rank, device, cache, groups[1][rank], rank - local, sender.wrap)
    sender.watch(runner.caches)
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
                runner.run(step_inputs([SequenceStep(chunk, position + first, blocks.tolist())], block_size), 1)
            computed = time.perf_counter()
            sent, done = sender.finish()
            if local == 0:  # the worker's first rank (which the logits reach last) reports its times
                times = torch.tensor([computed - start, done - sent, max(0.0, done - computed)], dtype=torch.float64)
                dist.send(times, 0, tag=base + len(runner.caches))


def serve_disaggregated(directory: str, rank: int, device: torch.device) -> None:
    """A spawned rank of disaggregated serving over an engine of ``tp x pp`` ranks: the
    engine's ranks 1.. serve rank 0's steps and receive their KV blocks (``serve_rank``),
    the ranks after them prefill, ``tp x pp`` to a worker (``serve_prefill``)."""
    tp, pp = (read_manifest(directory).get(key, 1) for key in ("tp", "pp"))
    groups = rank_groups(Layout(tp, pp), dist.get_world_size() // (tp * pp))
    if rank < tp * pp:
        serve_rank(directory, rank, device, groups)
    else:
        serve_prefill(directory, rank, device, groups)


@dataclass
class Transfer:
    """A sequence being prefilled by a worker: the base tag of its messages, how many
    blocks it sends, the tensor its timings arrive in, the messages in flight besides its
    blocks (``BlockReceiver``'s), and the prompt tokens the worker computes."""

    seq: Sequence
    base: int
    blocks: int
    times: torch.Tensor
    works: list
    tokens: int


class PrefillWorkers:
    """Rank 0's side: the prefill workers (``size`` ranks each, after the ``size`` ranks
    of the engine), what their caches hold (``holdings``), and the transfers into rank 0's
    ``caches``; the engine's other ranks (``decode``, when ``size`` > 1) hear of each
    transfer and receive their share of its blocks. ``processes`` are those of ranks 1..;
    the workers own them (and the process group) unless ``decode`` does."""

    def __init__(self, processes: list, caches: dict[str, torch.Tensor], holdings: WorkerHoldings, size: int = 1,
                 decode: WorkerGroup | None = None, scratch=None):
        self.processes = processes
        self.receiver = BlockReceiver(caches)
        self.holdings = holdings
        self.size = size
        self.decode = decode
        self._scratch = scratch
        self._layers = len(caches)
        self._requests = 0
        self._times = [0.0, 0.0, 0.0]  # prefill, transfer and exposed seconds of the landed requests
        self._counts = [0, 0, 0]  # their requests, blocks and tokens
        self._closed = False

    @classmethod
    def start(cls, engine: Engine, caches: dict[str, torch.Tensor], num_blocks: int, block_size: int,
              count: int, timeout_s: float = TIMEOUT_S) -> PrefillWorkers:
        """Spawn ``count`` prefill workers for an engine of one rank (CPU, gloo) and send
        them the cache layout."""
        _check_count(count)
        processes, scratch = spawn_workers(engine, count + 1, "kiln.runtime.disaggregated", timeout_s)[1:]
        workers = cls(processes, caches, WorkerHoldings(count, block_size), scratch=scratch)
        workers._guard(lambda: cache_layout(CacheLayout(num_blocks, block_size), torch.device("cpu")))
        return workers

    @classmethod
    def attach(cls, decode: WorkerGroup, block_size: int, count: int) -> PrefillWorkers:
        """The ``count`` prefill workers that ``WorkerGroup.start(..., prefill_workers=count)``
        spawned after the ranks of a parallel engine."""
        _check_count(count)
        return cls(decode.processes, decode.caches, WorkerHoldings(count, block_size), decode.layout.world_size,
                   decode)

    def dispatch(self, seq: Sequence) -> Transfer:
        """Send ``seq``'s tokens but the last, after what the chosen worker's cache holds
        (``WorkerHoldings.plan``), to each rank of that worker, and post the receives of the
        KV blocks that rank 0's prefix cache lacks (on every decode rank)."""
        plan = self.holdings.plan(seq)
        first_rank = self.size * (1 + plan.worker)
        base = (self._requests % _REQUESTS_IN_TAGS) * (self._layers + 1)
        self._requests += 1
        tokens = seq.tokens[plan.start:seq.num_tokens - 1]
        table = torch.tensor(seq.block_table, dtype=torch.int64)
        header = torch.tensor([len(tokens), len(table), base, plan.start, plan.first_block], dtype=torch.int64)
        payload = torch.cat([torch.tensor(tokens, dtype=torch.int64), table])
        blocks = table[plan.first_block:]

        def post() -> Transfer:
            ranks = range(first_rank, first_rank + self.size)
            works = [dist.isend(header, rank, tag=REQUEST_TAG) for rank in ranks]
            works += [dist.isend(payload, rank, tag=REQUEST_TAG + 1) for rank in ranks]
            self.receiver.post(base, first_rank, blocks)
            times = torch.empty(3, dtype=torch.float64)
            works.append(dist.irecv(times, first_rank, tag=base + self._layers))
            if self.decode is not None:
                self.decode.kv([POST, base, first_rank, *blocks.tolist()])
            return Transfer(seq, base, len(blocks), times, works, len(tokens))

        return self._guard(post)

    def arrived(self, transfer: Transfer) -> bool:
        """Whether every message of ``transfer`` to and from rank 0 has gone or come."""
        return all(work.is_completed() for work in transfer.works) and self.receiver.arrived(transfer.base)

    def land(self, transfer: Transfer) -> None:
        """Wait for ``transfer`` and copy its blocks into the decode ranks' caches."""
        self.wait(transfer)
        self._guard(lambda: self.receiver.land(transfer.base))
        if self.decode is not None:
            self.decode.kv([LAND, transfer.base])
        self._times = [a + float(b) for a, b in zip(self._times, transfer.times)]
        self._counts = [a + b for a, b in zip(self._counts, (1, transfer.blocks, transfer.tokens))]

    def drop(self, transfer: Transfer) -> None:
        """Forget ``transfer`` (its sequence ended): its blocks are drained, not copied."""
        self.receiver.drop(transfer.base)
        if self.decode is not None:
            self.decode.kv([DROP, transfer.base])

    def wait(self, transfer: Transfer) -> None:
        """Wait for ``transfer``'s messages (each once: a gloo receive waited for again
        waits for another message)."""
        def wait_all() -> None:
            while transfer.works:
                transfer.works.pop(0).wait()
            self.receiver.wait(transfer.base)

        self._guard(wait_all)

    def stats(self) -> PrefillStats:
        """The prefills landed so far."""
        requests, blocks, tokens = self._counts
        return PrefillStats(requests, *self._times, blocks, tokens)

    def _guard(self, fn):
        try:
            return fn()
        except WorkerError:
            raise  # the decode ranks' group named the rank already
        except RuntimeError as exc:
            raise failure(self.processes, exc, "prefill") from exc

    def close(self) -> None:
        """Tell the workers to stop; wait for them and leave the process group (once),
        unless the decode ranks' group does that."""
        if self._closed or not dist.is_initialized():
            return
        self._closed = True
        alive = all(p.poll() is None for p in self.processes)  # else the survivors are stuck or failing: killed
        try:
            if alive:
                for rank in range(self.size, len(self.processes) + 1):
                    dist.send(torch.tensor([-1] + [0] * (HEADER - 1)), rank, tag=REQUEST_TAG)
        finally:
            if self.decode is None:
                stop_workers(self.processes, self._scratch, 10.0 if alive else 0.0)


def _check_count(count: int) -> None:
    if count < 1:
        raise ValueError(f"disaggregated serving needs at least one prefill worker, got {count}")


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
            self.workers.drop(transfer)
            self._dropped.append(transfer)
        super().finish(seq, reason)


if __name__ == "__main__":
    run_worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], float(sys.argv[5]), serve_disaggregated)
