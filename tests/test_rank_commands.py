"""Rank 0's commands reach a worker as sent, over two gloo processes: a step's inputs
with its micro-batch count, a request's KV record, a decode graph to capture, a graph's
packed inputs broadcast into the start of the worker's staging buffer (the rest of it
untouched), and the stop."""

from __future__ import annotations

import torch
from gloo_ranks import run_ranks

from kiln.runtime.model_runner import INPUTS
from kiln.runtime.rank_commands import CAPTURE, KV, REPLAY, STEP, STOP, broadcast_command

CPU = torch.device("cpu")
STEP_INPUTS = {"ids": torch.tensor([5, 6, 7]), "positions": torch.tensor([0, 1, 9]),
               "slot_mapping": torch.tensor([0, 1, 40]), "query_start": torch.tensor([0, 2, 3], dtype=torch.int32),
               "context_lens": torch.tensor([2, 10], dtype=torch.int32),
               "block_tables": torch.tensor([[0, 0], [1, 2]], dtype=torch.int32),
               "logits_indices": torch.tensor([1, 2])}
STAGED = torch.arange(100, 110)


def _exchange(rank: int) -> list:
    if rank == 0:
        broadcast_command(STEP, CPU, STEP_INPUTS, microbatches=2)
        broadcast_command(KV, CPU, payload=torch.tensor([3, 1, 4, 1, 5]))
        broadcast_command(CAPTURE, CPU, microbatches=8)
        broadcast_command(REPLAY, CPU, microbatches=8, staged=STAGED)
        broadcast_command(STOP, CPU)
        return []
    staging = torch.full((16,), -1, dtype=torch.int64)
    received = []
    while not received or received[-1][0] != STOP:
        command, count, data = broadcast_command(STOP, CPU, staged=staging)
        if command == STEP:
            data = {name: (t.dtype, t.tolist()) for name, t in data.items()}
        elif command == REPLAY:
            data = staging.tolist()
        elif command == KV:
            data = data.tolist()
        received.append((command, count, data))
    return received


def test_a_worker_receives_every_command_as_rank_0_sent_it():
    got = run_ranks(_exchange, 2)[1]
    step = {name: (t.dtype, t.tolist()) for name, t in STEP_INPUTS.items()}
    assert [name for name, _ in INPUTS] == list(step)
    assert got == [(STEP, 2, step), (KV, 5, [3, 1, 4, 1, 5]), (CAPTURE, 8, None),
                   (REPLAY, 8, list(range(100, 110)) + [-1] * 6), (STOP, 1, None)]
