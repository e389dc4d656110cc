"""Tensor- and pipeline-parallel execution on torch.distributed: one process per rank.

Rank 0 is the serving process: it holds the scheduler and the sampler, and before each
step it broadcasts the step's inputs (ids, positions, block tables...) and how many
micro-batches to cut it into to the other ranks. Under tensor parallelism alone every
rank runs the same executor over its own shard of the weights and of the KV cache (the
same blocks on every rank, as one scheduler owns them), and the graph's collectives run
on the process group (gloo on CPUs, NCCL on GPUs); the logits come out whole on every
rank (the LM head's all_gather). Under pipeline parallelism each rank runs its stage
(``runtime/pipeline.py``: micro-batches, the values crossing between stages sent from
rank to rank, the last stage's logits sent to rank 0), its collectives on the group of
its stage's ranks. Rank 0 samples.

``WorkerGroup.start`` spawns the workers of ranks 1.. on this host, from the engine's
directory; under ``torchrun`` every process is started for us, and the ranks other than
0 call ``serve_rank``. A worker that dies or stops answering makes rank 0's next step
fail with a message naming the rank (collectives and receives time out after
``timeout_s``), and the engine fails that step's requests instead of hanging.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist

from ..backends import kernels_for
from ..version import __version__
from .engine import CacheSpec, Engine, load_engine
from .executor import load_executor
from .model_runner import INPUTS
from .pipeline import Layout, PipelineStats, StageRunner
from .pipeline_files import Stage, read_stage

STEP, STOP, STATS = 0, -1, -2  # what rank 0 broadcasts: a step, the end, or a request for the stage times
TIMEOUT_S = 60.0
COMMAND_TAG = 1 << 28  # rank 0's commands to each worker (the pipeline's messages have small tags)
IDLE_WAIT = datetime.timedelta(days=365)  # how long a worker waits for rank 0's next command: a server may idle


class WorkerError(RuntimeError):
    """A parallel worker died or stopped answering; names the rank."""


def collective_kernels(size: int, process_group: dist.ProcessGroup | None = None) -> dict[str, object]:
    """The collectives of a partitioned graph over ``size`` ranks, run on
    ``process_group`` (default: the whole world)."""
    def all_reduce(x: torch.Tensor, ranks: int, group: str) -> torch.Tensor:
        _check_group(ranks, size)
        out = x.clone()
        dist.all_reduce(out, group=process_group)
        return out

    def all_gather(x: torch.Tensor, dim: int, ranks: int, group: str) -> torch.Tensor:
        _check_group(ranks, size)
        parts = [torch.empty_like(x) for _ in range(ranks)]
        dist.all_gather(parts, x.contiguous(), group=process_group)
        return torch.cat(parts, dim)

    return {"all_reduce": all_reduce, "all_gather": all_gather}


def _check_group(ranks: int, size: int) -> None:
    if ranks != size:
        raise WorkerError(f"the engine was partitioned for {ranks} tensor-parallel ranks; {size} are running")


def broadcast_command(command: int, device: torch.device, inputs: Mapping[str, torch.Tensor] | None = None,
                      microbatches: int = 1) -> tuple[int, int, dict[str, torch.Tensor] | None]:
    """From rank 0 to every rank: ``command`` (``STEP``, ``STOP`` or ``STATS``) and, for a
    step, its micro-batch count and integer inputs (one header of shapes, sent to each
    rank, which waits for it without a time limit; then one packed int64 tensor,
    broadcast). Returns what rank 0 sent: (command, micro-batches, inputs or None)."""
    header = torch.zeros(2 + 2 * len(INPUTS), dtype=torch.int64, device=device)
    if dist.get_rank() == 0:
        header[0], header[1] = command, microbatches
        if command == STEP:
            shapes = [tuple(inputs[name].shape) + (1,) * (2 - inputs[name].dim()) for name, _ in INPUTS]
            header[2:] = torch.tensor([d for shape in shapes for d in shape])
        for work in [dist.isend(header, rank, tag=COMMAND_TAG) for rank in range(1, dist.get_world_size())]:
            work.wait()
    else:
        receive_from_rank0(header, COMMAND_TAG)
    command, microbatches = int(header[0]), int(header[1])
    if command != STEP:
        return command, microbatches, None
    shapes = header[2:].view(-1, 2).tolist()
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
    return STEP, microbatches, out


def receive_from_rank0(tensor: torch.Tensor, tag: int) -> None:
    """Receive ``tensor`` from rank 0, however long it takes: a worker waits for the next
    command while the server idles (a rank 0 that dies closes the connection, which ends
    the wait with an error)."""
    dist.irecv(tensor, 0, tag=tag).wait(IDLE_WAIT)


def _cache_layout(num_blocks: int, block_size: int, device: torch.device) -> tuple[int, int]:
    layout = torch.tensor([num_blocks, block_size], dtype=torch.int64, device=device)
    dist.broadcast(layout, 0)
    return int(layout[0]), int(layout[1])


def _gather_busy(busy_s: float, device: torch.device) -> list[float]:
    """Every rank's executor seconds, on every rank."""
    mine = torch.tensor([busy_s], dtype=torch.float64, device=device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    return [float(p) for p in parts]


def _stage_group(layout: Layout, rank: int) -> dist.ProcessGroup | None:
    """The process group of the tensor-parallel ranks of ``rank``'s stage (None: the whole
    world). Every rank creates every stage's group, in the same order, as torch.distributed asks."""
    if layout.pp == 1 or layout.tp == 1:
        return None
    groups = [dist.new_group(layout.stage_ranks(stage)) for stage in range(layout.pp)]
    return groups[layout.stage(rank)]


def stage_runner(engine: Engine, directory: str | os.PathLike | None, rank: int, device: torch.device,
                 num_blocks: int, block_size: int) -> StageRunner:
    """Rank ``rank``'s runner: its stage (the whole graph without pipeline parallelism,
    with the engine's weights; else the stage's files in ``directory``), the backend's
    kernels and the collectives of its stage's ranks, and caches for its layers."""
    info = engine.info
    layout = Layout(info.tp, info.pp)
    if info.pp == 1:
        stage, weights = Stage(0, True, engine.graph, engine.executor_source), engine.weights(device)
    else:
        if directory is None:
            raise ValueError("a pipeline-parallel engine's ranks read their stages from its directory: save it first")
        stage = read_stage(directory, layout.stage(rank), info.pp, layout.tp_rank(rank), info.tp, info.backend,
                           __version__)
        weights = {name: v.tensor().to(device) for name, v in stage.graph.constants.items()
                   if v.uses or v in stage.graph.outputs}
    kernels = {**kernels_for(info.backend, info.target, info.tuned_on, device, engine.kernel_configs),
               **collective_kernels(info.tp, _stage_group(layout, rank))}
    step = load_executor(stage.executor_source, f"executor.stage{stage.index}.py", weights, kernels)
    caches = stage.cache_inputs
    spec = CacheSpec(tuple(v.name for v in caches), tuple((v.shape[2], v.shape[3]) for v in caches),
                     caches[0].dtype.torch_dtype if caches else info.dtype, False)
    logits = engine.graph.outputs[0]
    step_inputs = [v for v in engine.graph.inputs if v.name in dict(INPUTS)]
    return StageRunner(stage, layout, rank, step, spec.allocate(num_blocks, block_size, device), step_inputs,
                       (int(logits.shape[-1]), logits.dtype.torch_dtype), device)


def serve_rank(directory: str | os.PathLike, rank: int, device: torch.device) -> None:
    """A worker's loop (its process group is initialized): load the rank's weights, take
    the cache layout from rank 0, and run every step rank 0 broadcasts, until it says stop."""
    engine = load_engine(directory, rank=rank)
    num_blocks, block_size = _cache_layout(0, 0, device)
    runner = stage_runner(engine, directory, rank, device, num_blocks, block_size)
    with torch.inference_mode():
        while True:
            command, microbatches, inputs = broadcast_command(STOP, device)
            if command == STOP:
                return
            if command == STATS:
                _gather_busy(runner.busy_s, device)
            else:
                runner.run(inputs, microbatches)


def _threads_per_rank(world_size: int) -> int:
    return max(1, (os.cpu_count() or 1) // world_size)


def run_worker(directory: str, rank: int, world_size: int, init_method: str, timeout_s: float,
               serve: Callable[[str, int, torch.device], None] = serve_rank) -> None:
    """A spawned worker: join the group (gloo) as ``rank`` and ``serve`` until told to stop."""
    torch.set_num_threads(_threads_per_rank(world_size))  # the ranks share this host's cores
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        serve(directory, rank, torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def spawn_workers(engine: Engine, world_size: int, module: str,
                  timeout_s: float) -> tuple[str, list[subprocess.Popen], tempfile.TemporaryDirectory]:
    """Start ``python -m module DIRECTORY RANK WORLD_SIZE INIT_METHOD TIMEOUT`` for ranks
    1.. on this host (the engine saved to a scratch directory if it has none) and join
    them as rank 0 (gloo); the engine's directory, the processes and the scratch directory."""
    scratch = tempfile.TemporaryDirectory(prefix="kiln-workers-")  # the rendezvous file, and the engine if unsaved
    directory = engine.directory
    if directory is None:
        directory = os.path.join(scratch.name, "engine")
        engine.save(directory)
    torch.set_num_threads(_threads_per_rank(world_size))  # the ranks share this host's cores
    init_method = f"file://{os.path.join(scratch.name, 'rendezvous')}"
    processes = [subprocess.Popen([sys.executable, "-m", module, str(directory), str(rank), str(world_size),
                                   init_method, str(timeout_s)]) for rank in range(1, world_size)]
    try:
        dist.init_process_group("gloo", init_method=init_method, rank=0, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError as exc:
        for p in processes:
            p.kill()
        scratch.cleanup()
        raise failure(processes, exc) from exc
    return str(directory), processes, scratch


def stop_workers(processes: list[subprocess.Popen], scratch: tempfile.TemporaryDirectory | None,
                 grace_s: float = 10.0) -> None:
    """Wait for the workers to exit (killing those that do not within ``grace_s``: 0 when
    they were not told to stop, as when one has died and the others cannot run a step), and
    leave the group."""
    for p in processes:
        try:
            p.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if processes:
        dist.destroy_process_group()
    if scratch is not None:
        scratch.cleanup()


def failure(processes: list[subprocess.Popen], exc: Exception, kind: str = "parallel") -> WorkerError:
    """The error that names the workers (ranks 1..) that exited, or says that one hangs."""
    dead = [f"rank {rank} exited with code {p.poll()}" for rank, p in enumerate(processes, 1) if p.poll() is not None]
    who = ", ".join(dead) if dead else "a rank stopped answering"
    return WorkerError(f"{kind} worker failed: {who}: {exc}")


class WorkerGroup:
    """Rank 0's side of a tensor- and/or pipeline-parallel engine: the worker processes of
    the other ranks (when it spawned them), rank 0's stage runner and its caches, and the
    step that broadcasts each step's inputs before running it. A step is cut into
    ``microbatches`` micro-batches (default: one per stage)."""

    def __init__(self, engine: Engine, directory: str | os.PathLike | None, device: torch.device,
                 processes: list[subprocess.Popen], num_blocks: int, block_size: int, microbatches: int | None = None,
                 scratch: tempfile.TemporaryDirectory | None = None):
        self.engine = engine
        self.device = device
        self.processes = processes
        self.layout = Layout(engine.info.tp, engine.info.pp)
        self.microbatches = microbatches or self.layout.pp
        self._scratch = scratch
        self._closed = False
        self._steps, self._wall_s, self._split = 0, 0.0, 0
        self._guard(lambda: _cache_layout(num_blocks, block_size, device))
        self.runner = self._guard(lambda: stage_runner(engine, directory, 0, device, num_blocks, block_size))
        self.caches = self.runner.caches

    @classmethod
    def start(cls, engine: Engine, num_blocks: int, block_size: int, device: torch.device,
              microbatches: int | None = None, timeout_s: float = TIMEOUT_S) -> WorkerGroup:
        """Spawn the workers of ranks 1.. (CPU, gloo), join them as rank 0, and send them
        the cache layout. Under torchrun (the process group already initialized, NCCL on
        GPUs), the other ranks run ``serve_rank`` themselves: nothing is spawned."""
        world_size = engine.info.tp * engine.info.pp
        if dist.is_initialized():
            if dist.get_world_size() != world_size:
                raise WorkerError(f"the engine has tp={engine.info.tp} x pp={engine.info.pp} ranks; "
                                  f"{dist.get_world_size()} processes are running")
            return cls(engine, engine.directory, device, [], num_blocks, block_size, microbatches)
        if device.type != "cpu":
            raise ValueError("workers spawned on one host run on the CPU (gloo); on GPUs start one process per "
                             "rank with torchrun (see docs/parallelism.md)")
        directory, processes, scratch = spawn_workers(engine, world_size, "kiln.runtime.distributed", timeout_s)
        return cls(engine, directory, device, processes, num_blocks, block_size, microbatches, scratch)

    def step(self, **tensors: torch.Tensor) -> list[torch.Tensor]:
        """Broadcast the step's inputs to the workers, then run rank 0's part of it; the
        step's logits (the executor's other outputs, the caches, stay with the ranks)."""
        inputs = {name: tensors[name] for name, _ in INPUTS}

        def run() -> list[torch.Tensor]:
            start = time.perf_counter()
            broadcast_command(STEP, self.device, inputs, self.microbatches)
            logits = self.runner.run(inputs, self.microbatches)
            self._wall_s += time.perf_counter() - start
            self._steps += 1
            self._split += min(self.microbatches, len(inputs["context_lens"]))
            return [logits]

        return self._guard(run)

    def stats(self) -> PipelineStats:
        """The steps' wall time on rank 0 and each stage's executor time so far (see ``PipelineStats``)."""
        busy = self._guard(lambda: (broadcast_command(STATS, self.device), _gather_busy(self.runner.busy_s,
                                                                                         self.device))[1])
        stages = tuple(busy[self.layout.rank(stage, 0)] for stage in range(self.layout.pp))
        return PipelineStats(self._steps, self._wall_s, stages, self._split / max(self._steps, 1))

    def _guard(self, fn):
        try:
            return fn()
        except RuntimeError as exc:
            raise failure(self.processes, exc) from exc

    def close(self) -> None:
        """Tell the workers to stop, wait for them, and leave the process group (once)."""
        if self._closed or not dist.is_initialized():
            return
        self._closed = True
        alive = all(p.poll() is None for p in self.processes)  # else the survivors are stuck or failing: killed
        try:
            if alive:
                broadcast_command(STOP, self.device)
        finally:
            stop_workers(self.processes, self._scratch, 10.0 if alive else 0.0)


if __name__ == "__main__":
    run_worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], float(sys.argv[5]))
