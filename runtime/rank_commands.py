"""Rank 0's commands to the other ranks of a parallel engine, and the values they share.

Between steps a worker waits for rank 0's next command without a time limit: a
point-to-point receive (a server may idle for hours; a rank 0 that dies closes the
connection, which ends the wait with an error). A command is a header of fixed size
(``broadcast_command``): ``STEP`` (then the step's integer inputs, packed into one tensor
and broadcast), ``STOP``, ``STATS`` (every rank's executor seconds, ``gather_busy``) or
``KV`` (then a payload: what a decode rank of disaggregated serving does with a request's
KV blocks, ``kv_transfer.BlockReceiver.handle``), ``CAPTURE`` (a decode step's CUDA graph
of the size the header gives, captured by every rank together) or ``REPLAY`` (then the
graph's packed inputs, broadcast into every rank's staging buffer; see
``model_runner.GraphPeers``). Commands reach the ranks of one process group, ranks 0.. of
its size: the world, or the decode ranks when prefill ranks follow.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping

import torch
import torch.distributed as dist

from .engine import CacheSpec
from .kv_cache import CacheLayout, plan_num_blocks
from .model_runner import INPUTS

# what rank 0 broadcasts: a step, the end, the stage times, KV blocks, a graph to capture or to replay
STEP, STOP, STATS, KV, CAPTURE, REPLAY = 0, -1, -2, -3, -4, -5
COMMAND_TAG = 1 << 28  # rank 0's commands to each worker (the pipeline's messages have small tags)
_PPM = 1_000_000  # the memory fraction travels in parts per million
IDLE_WAIT = datetime.timedelta(days=365)  # how long a worker waits for rank 0's next command: a server may idle


def broadcast_command(command: int, device: torch.device, inputs: Mapping[str, torch.Tensor] | None = None,
                      microbatches: int = 1, group: dist.ProcessGroup | None = None,
                      payload: torch.Tensor | None = None, staged: torch.Tensor | None = None
                      ) -> tuple[int, int, object]:
    """From rank 0 to every rank of ``group`` (the ranks 0.. of its size; default: the
    world): ``command`` and, for a step, its micro-batch count and integer inputs (one
    header of shapes, sent to each rank, which waits for it without a time limit; then one
    packed int64 tensor, broadcast); for ``KV``, an int64 ``payload`` sent after the header
    (a ``kv_transfer.BlockReceiver`` record); for ``CAPTURE`` and ``REPLAY``, the graph's
    size in place of the micro-batch count, and for ``REPLAY`` rank 0's ``staged`` inputs,
    broadcast into the start of each other rank's ``staged`` (its staging buffer).
    Returns what rank 0 sent: (command; the micro-batches, the graph's size or the payload's
    length; the inputs, the payload or None)."""
    length = 2 + 2 * len(INPUTS)
    if dist.get_rank() == 0:
        fields = [command, microbatches if payload is None else len(payload)]
        if command == REPLAY:
            fields.append(len(staged))
        if command == STEP:
            shapes = [tuple(inputs[name].shape) + (1,) * (2 - inputs[name].dim()) for name, _ in INPUTS]
            fields += [d for shape in shapes for d in shape]
        fields += [0] * (length - len(fields))
        header = torch.tensor(fields, dtype=torch.int64)
        if device.type == "cuda":  # sent without waiting for the device: rank 0 may launch ahead of it
            header = header.pin_memory().to(device, non_blocking=True)
        ranks = range(1, dist.get_world_size(group))
        works = [dist.isend(header, rank, tag=COMMAND_TAG) for rank in ranks]
        works += [dist.isend(payload, rank, tag=COMMAND_TAG + 1) for rank in ranks if payload is not None]
        for work in works:
            work.wait()
    else:
        header = torch.empty(length, dtype=torch.int64, device=device)
        receive_from_rank0(header, COMMAND_TAG)
        fields = header.tolist()
    command, count = fields[0], fields[1]
    if command == REPLAY:
        dist.broadcast(staged[:fields[2]], 0, group=group)
        return command, count, None
    if command == KV:
        if dist.get_rank() != 0:
            payload = torch.empty(count, dtype=torch.int64)
            dist.recv(payload, 0, tag=COMMAND_TAG + 1)
        return command, count, payload
    if command != STEP:
        return command, count, None
    shapes = list(zip(fields[2::2], fields[3::2]))
    sizes = [rows * cols for rows, cols in shapes]
    if dist.get_rank() == 0:
        packed = torch.cat([inputs[name].to(device).flatten().long() for name, _ in INPUTS])
    else:
        packed = torch.empty(sum(sizes), dtype=torch.int64, device=device)
    dist.broadcast(packed, 0, group=group)
    out, at = {}, 0
    for (name, dtype), size, (rows, cols) in zip(INPUTS, sizes, shapes):
        view = packed[at:at + size]
        out[name] = (view.view(rows, cols) if name == "block_tables" else view).to(dtype)
        at += size
    return STEP, count, out


def receive_from_rank0(tensor: torch.Tensor, tag: int) -> None:
    """Receive ``tensor`` from rank 0, however long it takes: a worker waits for the next
    command while the server idles (a rank 0 that dies closes the connection, which ends
    the wait with an error)."""
    dist.irecv(tensor, 0, tag=tag).wait(IDLE_WAIT)


def cache_layout(layout: CacheLayout | None, device: torch.device) -> CacheLayout:
    """Rank 0's ``layout``, on every rank of the world (the others pass None)."""
    fields = [layout.num_blocks, layout.block_size, round(layout.memory_fraction * _PPM), layout.useful_blocks,
              layout.reserve_bytes] if layout is not None else [0] * 5
    sent = torch.tensor(fields, dtype=torch.int64, device=device)
    dist.broadcast(sent, 0)
    num_blocks, block_size, fraction, useful, reserve = sent.tolist()
    return CacheLayout(num_blocks, block_size, fraction / _PPM, useful, reserve)


def agree_num_blocks(layout: CacheLayout, spec: CacheSpec, device: torch.device) -> int:
    """The blocks every rank of the world allocates: ``layout``'s count, or else the fewest
    that the ranks' plans allow, each made with its own weights already on ``device``
    (ranks on the CPU share the host's memory, so each plans for its share of it)."""
    if layout.num_blocks:
        return layout.num_blocks
    sharers = dist.get_world_size() if device.type == "cpu" else 1
    problem = None
    try:
        mine = plan_num_blocks(spec, layout.block_size, device, layout.memory_fraction, layout.useful_blocks,
                               layout.reserve_bytes, sharers)
    except MemoryError as exc:  # the other ranks must still hear of it, or they would wait forever
        mine, problem = 0, exc
    agreed = torch.tensor([mine], dtype=torch.int64, device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    if problem is not None:
        raise problem
    if not agreed.item():
        raise MemoryError(f"rank {dist.get_rank()}: another rank has no room for a KV cache")
    return int(agreed.item())


def gather_busy(busy_s: float, device: torch.device, group: dist.ProcessGroup | None = None) -> list[float]:
    """Every rank's executor seconds (of ``group``: default, the world), on every rank."""
    mine = torch.tensor([busy_s], dtype=torch.float64, device=device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    return [float(p) for p in parts]
