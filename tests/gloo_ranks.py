"""Run a function on several gloo ranks, each in a forked process of its own, and collect
what each returned (or the message of the exception it raised)."""

from __future__ import annotations

import multiprocessing
import socket
from collections.abc import Callable
from typing import Any

import torch.distributed as dist


def run_ranks(fn: Callable[[int], Any], world_size: int, timeout_s: float = 60) -> dict[int, Any]:
    """``{rank: fn(rank)}`` over ``world_size`` processes joined in one gloo group; a rank
    whose ``fn`` raises gives ``"TypeName: message"`` instead."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = multiprocessing.get_context("fork")
    results = context.Queue()

    def rank_main(rank: int) -> None:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
        try:
            results.put((rank, fn(rank)))
        except Exception as exc:  # noqa: BLE001 - reported to the test, which checks it
            results.put((rank, f"{type(exc).__name__}: {exc}"))
        finally:
            dist.destroy_process_group()

    processes = [context.Process(target=rank_main, args=(rank,)) for rank in range(world_size)]
    for p in processes:
        p.start()
    got = dict(results.get(timeout=timeout_s) for _ in processes)
    for p in processes:
        p.join(timeout=30)
    return got
