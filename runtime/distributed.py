"""Tensor-parallel execution on torch.distributed: one process per rank.

Rank 0 is the serving process: it holds the scheduler and the sampler, and before each
step it broadcasts the step's inputs (ids, positions, block tables...) to the other
ranks; then every rank runs the same executor over its own shard of the weights and its
own shard of the KV cache (the same blocks on every rank, as one scheduler owns them),
and the graph's collectives run on the process group (gloo on CPUs, NCCL on GPUs). The
logits come out whole on every rank (the LM head's all_gather); rank 0 samples.

``TensorParallelGroup.start`` spawns the workers of ranks 1.. on this host, from the
engine's directory; under ``torchrun`` every process is started for us, and the ranks
other than 0 call ``serve_rank``. A worker that dies or stops answering makes rank 0's
next step fail with a message naming the rank (collectives time out after
``timeout_s``), and the engine fails that step's requests instead of hanging.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping

import torch
import torch.distributed as dist

from ..backends import kernels_for
from .engine import Engine, load_engine
from .executor import Step, load_executor
from .model_runner import INPUTS

STOP = -1
TIMEOUT_S = 60.0


class WorkerError(RuntimeError):
    """A tensor-parallel worker died or stopped answering; names the rank."""


def collective_kernels(world_size: int) -> dict[str, object]:
    """The collectives of a partitioned graph, run on the default process group."""
    def all_reduce(x: torch.Tensor, ranks: int, group: str) -> torch.Tensor:
        _check_group(ranks, world_size)
        out = x.clone()
        dist.all_reduce(out)
        return out

    def all_gather(x: torch.Tensor, dim: int, ranks: int, group: str) -> torch.Tensor:
        _check_group(ranks, world_size)
        parts = [torch.empty_like(x) for _ in range(ranks)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim)

    return {"all_reduce": all_reduce, "all_gather": all_gather}


def _check_group(ranks: int, world_size: int) -> None:
    if ranks != world_size:
        raise WorkerError(f"the engine was partitioned for {ranks} ranks; {world_size} are running")


def rank_step(engine: Engine, device: torch.device) -> Step:
    """The engine's executor over its weights (rank 0's, unless it was loaded for
    another rank), with collectives on the process group."""
    kernels = {**kernels_for(engine.info.backend, engine.info.target, engine.info.tuned_on, device,
                             engine.kernel_configs), **collective_kernels(dist.get_world_size())}
    return load_executor(engine.executor_source, "executor.py", engine.weights(device), kernels)


def broadcast_step(inputs: Mapping[str, torch.Tensor] | None, device: torch.device) -> dict[str, torch.Tensor] | None:
    """From rank 0, a step's integer inputs (None: stop) to every rank, as one header of
    shapes and one packed int64 tensor."""
    header = torch.zeros(1 + 2 * len(INPUTS), dtype=torch.int64, device=device)
    if dist.get_rank() == 0:
        if inputs is None:
            header[0] = STOP
        else:
            shapes = [tuple(inputs[name].shape) + (1,) * (2 - inputs[name].dim()) for name, _ in INPUTS]
            header[1:] = torch.tensor([d for shape in shapes for d in shape])
    dist.broadcast(header, 0)
    if int(header[0]) == STOP:
        return None
    shapes = header[1:].view(-1, 2).tolist()
    sizes = [rows * cols for rows, cols in shapes]
    if dist.get_rank() == 0:
        packed = torch.cat([inputs[name].to(device).flatten().long() for name, _ in INPUTS])
    else:
        packed = torch.empty(sum(sizes), dtype=torch.int64, device=device)
    dist.broadcast(packed, 0)
    out, at = {}, 0
    for (name, dtype), size, (rows, cols) in zip(INPUTS, sizes, shapes):
        view = packed[at:at + size]
        out[name] = (view.view(rows, cols) if name == "block_tables" else view).to(dtype)
        at += size
    return out


def _cache_layout(num_blocks: int, block_size: int, device: torch.device) -> tuple[int, int]:
    layout = torch.tensor([num_blocks, block_size], dtype=torch.int64, device=device)
    dist.broadcast(layout, 0)
    return int(layout[0]), int(layout[1])


def serve_rank(directory: str | os.PathLike, rank: int, device: torch.device) -> None:
    """A worker's loop (its process group is initialized): load the rank's weights, take
    the cache layout from rank 0, and run every step rank 0 broadcasts, until it says stop."""
    engine = load_engine(directory, rank=rank)
    num_blocks, block_size = _cache_layout(0, 0, device)
    caches = engine.cache_spec.allocate(num_blocks, block_size, device)
    step = rank_step(engine, device)
    with torch.inference_mode():
        while (inputs := broadcast_step(None, device)) is not None:
            step(**inputs, **caches)


def _threads_per_rank(world_size: int) -> int:
    return max(1, (os.cpu_count() or 1) // world_size)


def run_worker(directory: str, rank: int, world_size: int, init_method: str, timeout_s: float) -> None:
    """A spawned worker: join the group (gloo) as ``rank`` and serve until told to stop."""
    torch.set_num_threads(_threads_per_rank(world_size))  # the ranks share this host's cores
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        serve_rank(directory, rank, torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def _failure(processes: list[subprocess.Popen], exc: Exception) -> WorkerError:
    """The error that names the workers (ranks 1..) that exited, or says that one hangs."""
    dead = [f"rank {rank} exited with code {p.poll()}" for rank, p in enumerate(processes, 1) if p.poll() is not None]
    who = ", ".join(dead) if dead else "a rank stopped answering"
    return WorkerError(f"tensor-parallel worker failed: {who}: {exc}")


class TensorParallelGroup:
    """Rank 0's side of a tensor-parallel engine on this host: the worker processes of
    the other ranks, and the step that broadcasts each step's inputs before running
    rank 0's shard."""

    def __init__(self, engine: Engine, device: torch.device, processes: list[subprocess.Popen],
                 scratch: tempfile.TemporaryDirectory | None = None):
        self.engine = engine
        self.device = device
        self.processes = processes
        self._scratch = scratch
        self._closed = False
        self._local = rank_step(engine, device)

    @classmethod
    def start(cls, engine: Engine, num_blocks: int, block_size: int, device: torch.device,
              timeout_s: float = TIMEOUT_S) -> TensorParallelGroup:
        """Spawn the workers of ranks 1..tp-1 (CPU, gloo), join them as rank 0, and send
        them the cache layout. Under torchrun (the process group already initialized,
        NCCL on GPUs), the other ranks run ``serve_rank`` themselves: nothing is spawned."""
        if dist.is_initialized():
            group = cls(engine, device, [])
            group._guard(lambda: _cache_layout(num_blocks, block_size, device))
            return group
        if device.type != "cpu":
            raise ValueError("workers spawned on one host run on the CPU (gloo); on GPUs start one process per "
                             "rank with torchrun (see docs/parallelism.md)")
        world_size = engine.info.tp
        scratch = tempfile.TemporaryDirectory(prefix="kiln-tp-")  # the rendezvous file, and the engine if unsaved
        directory = engine.directory
        if directory is None:
            directory = os.path.join(scratch.name, "engine")
            engine.save(directory)
        torch.set_num_threads(_threads_per_rank(world_size))  # the ranks share this host's cores
        init_method = f"file://{os.path.join(scratch.name, 'rendezvous')}"
        processes = [subprocess.Popen([sys.executable, "-m", "kiln.runtime.distributed", str(directory), str(rank),
                                       str(world_size), init_method, str(timeout_s)]) for rank in range(1, world_size)]
        try:
            dist.init_process_group("gloo", init_method=init_method, rank=0, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        except RuntimeError as exc:
            for p in processes:
                p.kill()
            raise _failure(processes, exc) from exc
        group = cls(engine, device, processes, scratch)
        group._guard(lambda: _cache_layout(num_blocks, block_size, device))
        return group

    def step(self, **tensors: torch.Tensor) -> list[torch.Tensor]:
        """Broadcast the step's inputs to the workers, then run rank 0's shard."""
        def run():
            broadcast_step({name: tensors[name] for name, _ in INPUTS}, self.device)
            return self._local(**tensors)

        return self._guard(run)

    def _guard(self, fn):
        try:
            return fn()
        except RuntimeError as exc:
            raise _failure(self.processes, exc) from exc

    def close(self) -> None:
        """Tell the workers to stop, wait for them, and leave the process group (once)."""
        if self._closed or not dist.is_initialized():
            return
        self._closed = True
        try:
            if all(p.poll() is None for p in self.processes):
                broadcast_step(None, self.device)
        finally:
            for p in self.processes:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
            if self.processes:
                dist.destroy_process_group()
            if self._scratch is not None:
                self._scratch.cleanup()



if __name__ == "__main__":
    run_worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], float(sys.argv[5]))
