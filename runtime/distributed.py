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
``timeout_s``), and the engine fails that step's requests instead of hanging. Rank 0's
commands travel as ``rank_commands`` says. With disaggregated prefill workers
(``runtime/disaggregated.py``) the engine's ranks are the first of the world, on a process
group of their own, and the prefill workers' ranks follow them.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from ..backends import kernels_for
from ..ir.opdefs.moe import moe_experts_reference
from ..version import __version__
from .engine import CacheSpec, Engine, load_engine
from .engine_files import MANIFEST
from .kv_cache import CacheLayout
from .executor import load_executor
from .expert_exchange import exchange_kernels
from .kv_transfer import BlockReceiver
from .model_runner import INPUTS, ModelRunner, Step
from .pipeline import Layout, PipelineStats, StageRunner
from .pipeline_files import Stage, read_stage
from .rank_commands import (CAPTURE, KV, REPLAY, STATS, STEP, STOP, agree_num_blocks, broadcast_command, cache_layout,
                            gather_busy)

TIMEOUT_S = 60.0


class WorkerError(RuntimeError):
    """A parallel worker died or stopped answering; names the rank."""


def collective_kernels(size: int, process_group: dist.ProcessGroup | None = None,
                       experts: Callable | None = None) -> dict[str, object]:
    """The collectives of a partitioned graph over ``size`` ranks, run on
    ``process_group`` (default: the whole world); the expert-parallel all-to-all ops run
    the rank's experts with ``experts`` (default: the reference ``moe_experts``)."""
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

    return {"all_reduce": all_reduce, "all_gather": all_gather,
            **exchange_kernels(size, process_group, experts or moe_experts_reference)}


def _check_group(ranks: int, size: int) -> None:
    if ranks != size:
        raise WorkerError(f"the engine was partitioned for {ranks} tensor-parallel ranks; {size} are running")


Groups = tuple[dist.ProcessGroup | None, dict[int, dist.ProcessGroup | None]]


def rank_groups(layout: Layout, instances: int = 1) -> Groups:
    """The process groups of ``instances`` copies of ``layout`` laid end to end (the
    engine's ranks, then each disaggregated prefill worker's): the first copy's ranks, which
    rank 0's commands reach (None: the whole world, or rank 0 alone), and for every rank the
    group of its stage's tensor-parallel ranks, its collectives' (None: the whole world, or
    no collectives at tp = 1). Every rank creates every group, in this order, as
    torch.distributed asks."""
    size = layout.world_size
    world = size * instances
    command = None if size in (1, world) else dist.new_group(list(range(size)))
    stage_groups = {}
    for copy in range(instances):
        for stage in range(layout.pp):
            ranks = dataclasses.replace(layout, base=copy * size).stage_ranks(stage)
            group = None if layout.tp == 1 or len(ranks) == world else dist.new_group(ranks)
            stage_groups.update(dict.fromkeys(ranks, group))
    return command, stage_groups


def stage_runner(engine: Engine, directory: str | os.PathLike | None, rank: int, device: torch.device,
                 cache: CacheLayout, group: dist.ProcessGroup | None = None, base: int = 0,
                 wrap: Callable[[Callable], Callable] | None = None) -> StageRunner:
    """Rank ``rank``'s runner in the copy of the engine's ranks that starts at ``base``:
    its stage (the whole graph without pipeline parallelism, with the engine's weights;
    else the stage's files in ``directory``), the backend's kernels (those that write the
    caches passed through ``wrap``, if given) and the collectives of its stage's ranks (on ``group``: default, the
    world), and caches for its layers, sized once its weights are on ``device`` (``agree_num_blocks``: every
    rank of the world takes part)."""
    info = engine.info
    layout = Layout(info.tp, info.pp, base)
    if info.pp == 1:
        stage, weights = Stage(0, True, engine.graph, engine.executor_source), engine.weights(device)
    else:
        if directory is None:
            raise ValueError("a pipeline-parallel engine's ranks read their stages from its directory: save it first")
        stage = read_stage(directory, layout.stage(rank), info.pp, layout.tp_rank(rank), info.tp, info.backend,
                           __version__)
        weights = {name: v.tensor().to(device) for name, v in stage.graph.constants.items()
                   if v.uses or v in stage.graph.outputs}
    kernels = kernels_for(info.backend, info.target, info.tuned_on, device, engine.kernel_configs)
    if wrap is not None:  # around the kernels of the ops that write the caches (the stage's last outputs)
        written = stage.graph.outputs[len(stage.graph.outputs) - len(stage.cache_inputs):]
        writers = {v.producer.op for v in written if v.producer is not None}
        kernels = {op: wrap(kernel) if op in writers else kernel for op, kernel in kernels.items()}
    kernels.update(collective_kernels(info.tp, group, kernels["moe_experts"]))
    step = load_executor(stage.executor_source, f"executor.stage{stage.index}.py", weights, kernels)
    inputs = stage.cache_inputs
    spec = CacheSpec(tuple(v.name for v in inputs), tuple((v.shape[2], v.shape[3]) for v in inputs),
                     inputs[0].dtype.torch_dtype if inputs else info.dtype, False)
    logits = engine.graph.outputs[0]
    step_inputs = [v for v in engine.graph.inputs if v.name in dict(INPUTS)]
    caches = spec.allocate(agree_num_blocks(cache, spec, device), cache.block_size, device)
    logits_type = (int(logits.shape[-1]), logits.dtype.torch_dtype)
    return StageRunner(stage, layout, rank, step, caches, step_inputs, logits_type, device)


def serve_rank(directory: str | os.PathLike, rank: int, device: torch.device, groups: Groups | None = None) -> None:
    """A worker's loop (its process group is initialized): load the rank's weights, take
    the cache layout from rank 0, and run every step rank 0 broadcasts to the engine's
    ranks, or receive the KV blocks of disaggregated serving as rank 0 says, until it says
    stop. ``groups`` are ``rank_groups``' (default: those of the engine's ranks alone)."""
    engine = load_engine(directory, rank=rank)
    group, stage_groups = groups or rank_groups(Layout(engine.info.tp, engine.info.pp))
    cache = cache_layout(None, device)
    runner = stage_runner(engine, directory, rank, device, cache, stage_groups[rank])
    receiver = BlockReceiver(runner.caches)
    graphs = None  # this rank's decode graphs, made when rank 0 first asks for one
    with torch.inference_mode():
        while True:
            command, count, data = broadcast_command(STOP, device, group=group,
                                                     staged=graphs.staging if graphs else None)
            if command == STOP:
                return
            if command == STATS:
                gather_busy(runner.busy_s, device, group)
            elif command == KV:
                receiver.handle(data.tolist(), rank)
            elif command == CAPTURE:
                graphs = graphs or rank_graphs(engine, runner.step, runner.caches, device, cache.block_size)
                graphs.capture(count)
            elif command == REPLAY:
                graphs.replay_staged(count)
            else:
                runner.run(data, count)


def rank_graphs(engine: Engine, step: Step, caches: dict[str, torch.Tensor], device: torch.device,
                block_size: int) -> ModelRunner:
    """A tensor-parallel rank's runner of decode graphs, for every size the engine captures
    (rank 0 asks for those it serves), its staging buffer laid out as rank 0's."""
    max_blocks = -(-engine.info.max_seq_len // block_size)
    return ModelRunner(step, caches, device, block_size, max_blocks, engine.info.profiles.cuda_graph_batch_sizes)


def join_torchrun(directory: str | os.PathLike, device: str | None = None) -> tuple[int, torch.device] | None:
    """In a process that torchrun started (``WORLD_SIZE`` > 1 in its environment): join the
    world on this rank's device (``cuda:LOCAL_RANK`` and NCCL where there is a GPU and
    ``device`` does not say "cpu"; else the CPU and gloo). Ranks other than 0 then serve
    rank 0's steps of the engine in ``directory`` until it stops them, and leave the world.
    Returns (rank, device), or None outside torchrun; rank 0 goes on to serve, and
    ``leave_world`` ends its part."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not (Path(directory) / MANIFEST).is_file():
        raise ValueError(f"{directory} is not an engine directory: under torchrun every rank loads the same engine, "
                         f"built first with `kiln build CHECKPOINT --tp N --pp M -o DIR`")
    gpu = torch.cuda.is_available() and (device or "cuda").split(":")[0] != "cpu"
    on = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if gpu else "cpu")
    if gpu:
        torch.cuda.set_device(on)
    dist.init_process_group("nccl" if gpu else "gloo")
    rank = dist.get_rank()
    if rank:
        try:
            serve_rank(directory, rank, on)
        finally:
            leave_world()
    return rank, on


def leave_world() -> None:
    """Leave the process group that ``join_torchrun`` joined, if any."""
    if dist.is_initialized():
        dist.destroy_process_group()


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
    ``microbatches`` micro-batches (default: one per stage). ``groups`` are
    ``rank_groups``': the engine's ranks are the world, or a group (ranks 0..) when
    disaggregated serving adds prefill ranks after them."""

    def __init__(self, engine: Engine, directory: str | os.PathLike | None, device: torch.device,
                 processes: list[subprocess.Popen], cache: CacheLayout, groups: Groups,
                 microbatches: int | None = None, scratch: tempfile.TemporaryDirectory | None = None):
        self.engine = engine
        self.device = device
        self.processes = processes  # of ranks 1.., prefill ranks included
        self.group, stage_groups = groups
        self.layout = Layout(engine.info.tp, engine.info.pp)
        self.microbatches = microbatches or self.layout.pp
        self._scratch = scratch
        self._closed = False
        self._steps, self._wall_s, self._split = 0, 0.0, 0
        self._guard(lambda: cache_layout(cache, device))
        self.runner = self._guard(lambda: stage_runner(engine, directory, 0, device, cache, stage_groups[0]))
        self.caches = self.runner.caches
        self.num_blocks = next(iter(self.caches.values())).shape[0]  # the count every rank agreed on

    @classmethod
    def start(cls, engine: Engine, cache: CacheLayout, device: torch.device,
              microbatches: int | None = None, prefill_workers: int = 0,
              timeout_s: float = TIMEOUT_S) -> WorkerGroup:
        """Spawn the workers of ranks 1.. (CPU, gloo), join them as rank 0, and send them
        the cache layout (``cache``: where its block count is 0, every rank plans its cache
        after loading its weights, and all take the fewest blocks); with ``prefill_workers``,
        as many prefill workers of ``tp x pp`` ranks each follow (``runtime/disaggregated.py``).
        Under torchrun (the process group already initialized, NCCL on GPUs), the other ranks
        run ``serve_rank`` themselves: nothing is spawned."""
        info = engine.info
        layout = Layout(info.tp, info.pp)
        world_size = layout.world_size
        if dist.is_initialized():
            if prefill_workers:
                raise ValueError("disaggregated serving starts its workers itself; under torchrun it is not written")
            if dist.get_world_size() != world_size:
                raise WorkerError(f"the engine has tp={engine.info.tp} x pp={engine.info.pp} ranks; "
                                  f"{dist.get_world_size()} processes are running")
            return cls(engine, engine.directory, device, [], cache, rank_groups(layout), microbatches)
        if device.type != "cpu":
            raise ValueError("workers spawned on one host run on the CPU (gloo); on GPUs start one process per "
                             "rank with torchrun (see docs/parallelism.md)")
        module = "kiln.runtime.disaggregated" if prefill_workers else "kiln.runtime.distributed"
        directory, processes, scratch = spawn_workers(engine, world_size * (1 + prefill_workers), module, timeout_s)
        try:
            groups = rank_groups(layout, 1 + prefill_workers)
        except RuntimeError as exc:
            raise failure(processes, exc) from exc
        return cls(engine, directory, device, processes, cache, groups, microbatches, scratch)

    def step(self, **tensors: torch.Tensor) -> list[torch.Tensor]:
        """Broadcast the step's inputs to the workers, then run rank 0's part of it; the
        step's logits (the executor's other outputs, the caches, stay with the ranks)."""
        inputs = {name: tensors[name] for name, _ in INPUTS}

        def run() -> list[torch.Tensor]:
            start = time.perf_counter()
            broadcast_command(STEP, self.device, inputs, self.microbatches, self.group)
            logits = self.runner.run(inputs, self.microbatches)
            self._wall_s += time.perf_counter() - start
            self._steps += 1
            self._split += min(self.microbatches, len(inputs["context_lens"]))
            return [logits]

        return self._guard(run)

    def stats(self) -> PipelineStats:
        """The steps' wall time on rank 0 and each stage's executor time so far (see ``PipelineStats``)."""
        busy = self._guard(lambda: (broadcast_command(STATS, self.device, group=self.group),
                                    gather_busy(self.runner.busy_s, self.device, self.group))[1])
        stages = tuple(busy[self.layout.rank(stage, 0)] for stage in range(self.layout.pp))
        return PipelineStats(self._steps, self._wall_s, stages, self._split / max(self._steps, 1))

    @property
    def local_step(self) -> Step:
        """Rank 0's own executor (``GraphPeers``: what its decode graphs capture)."""
        return self.runner.step

    def capture(self, size: int) -> None:
        """Have the other ranks capture their decode graphs of ``size`` sequences (``GraphPeers``)."""
        self._guard(lambda: broadcast_command(CAPTURE, self.device, microbatches=size, group=self.group))

    def replay(self, size: int, staged: torch.Tensor) -> None:
        """Broadcast a decode graph's packed inputs and have the other ranks replay theirs (``GraphPeers``)."""
        self._guard(lambda: broadcast_command(REPLAY, self.device, microbatches=size, group=self.group,
                                              staged=staged))

    def kv(self, record: list[int]) -> None:
        """Tell the other ranks about a request's KV blocks (``kv_transfer.BlockReceiver.handle``)."""
        payload = torch.tensor(record, dtype=torch.int64)
        self._guard(lambda: broadcast_command(KV, self.device, group=self.group, payload=payload))

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
                broadcast_command(STOP, self.device, group=self.group)
        finally:
            stop_workers(self.processes, self._scratch, 10.0 if alive else 0.0)


if __name__ == "__main__":
    run_worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], float(sys.argv[5]))
