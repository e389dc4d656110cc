"""Tensor-parallel serving throughput: one process per rank, under torchrun or alone.

    python bench/parallel.py models --tp 1                         # world size 1
    torchrun --nproc-per-node 2 bench/parallel.py CKPT_OR_ENGINE --tp 2 --target h100 --json out.json
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-endpoint HOST:29500 bench/parallel.py ENGINE --tp 16

Rank 0 builds the engine (when given a checkpoint) into ``--engine-dir``, every rank
loads its own weights from there, rank 0 serves batches of random prompts
(``--input-len`` tokens in, ``--output-len`` out, ``ignore_eos``) at each concurrency
and prints output tokens/s (and writes ``--json``); the other ranks run the steps rank 0
broadcasts. NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

import kiln
from kiln.runtime.distributed import serve_rank
from kiln.runtime.engine_files import MANIFEST
from kiln.runtime.llm_engine import RuntimeConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a checkpoint directory or an engine directory")
    parser.add_argument("--tp", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    parser.add_argument("--target", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--engine-dir", default=None, help="where rank 0 builds the engine (default: under /tmp)")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--num-blocks", type=int, default=None, help="KV-cache blocks of 16 (default: what the batch needs)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world != args.tp:
        raise SystemExit(f"--tp {args.tp} needs {args.tp} processes; {world} are running (start them with torchrun)")
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if args.target != "cpu" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    directory = _engine_directory(args, rank, world)
    if rank != 0:
        serve_rank(directory, rank, device)
    else:
        _bench(args, directory, device)
    if world > 1:
        dist.destroy_process_group()


def _engine_directory(args, rank: int, world: int) -> str:
    """The engine every rank loads: the one given, or the one rank 0 builds."""
    if (Path(args.model) / MANIFEST).is_file():
        return args.model
    directory = args.engine_dir or f"/tmp/kiln-parallel-{Path(args.model).name}-tp{args.tp}"
    if rank == 0:
        max_seq_len = args.input_len + args.output_len
        kiln.compile(args.model, target=args.target, dtype=args.dtype, tp=args.tp, max_batch_size=max(args.concurrency),
                     max_seq_len=max_seq_len).save(directory)
    if world > 1:
        dist.barrier()
    return directory


def _bench(args, directory: str, device: torch.device) -> None:
    engine = kiln.load(directory)
    blocks = args.num_blocks or max(args.concurrency) * -(-(args.input_len + args.output_len) // 16)
    llm = kiln.LLM(engine, RuntimeConfig(device=str(device), num_blocks=blocks))
    vocab = engine.vocab_size
    params = kiln.SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    llm.generate([torch.randint(0, vocab, (args.input_len,), generator=gen).tolist()], params)  # warm-up
    results = []
    for concurrency in args.concurrency:
        prompts = [torch.randint(0, vocab, (args.input_len,), generator=gen).tolist() for _ in range(concurrency)]
        start = time.perf_counter()
        outputs = llm.generate(prompts, params)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.token_ids) for o in outputs)
        results.append({"tp": args.tp, "concurrency": concurrency, "output_tokens": tokens, "seconds": seconds,
                        "output_tokens_per_s": tokens / seconds})
        print(f"tp={args.tp} concurrency={concurrency}: {tokens / seconds:,.1f} output tok/s ({seconds:.2f} s)")
    llm.close()
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
