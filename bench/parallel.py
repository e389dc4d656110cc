"""Tensor- and pipeline-parallel serving throughput: one process per rank, under torchrun or alone.

    python bench/parallel.py models --tp 1                         # world size 1
    torchrun --nproc-per-node 2 bench/parallel.py CKPT_OR_ENGINE --tp 2 --target h100 --json out.json
    torchrun --nproc-per-node 4 bench/parallel.py CKPT_OR_ENGINE --tp 2 --pp 2 --microbatches 4
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-endpoint HOST:29500 bench/parallel.py ENGINE --tp 8 --pp 2

Rank 0 builds the engine (when given a checkpoint) into ``--engine-dir``, every rank
loads its own weights from there, rank 0 serves batches of random prompts
(``--input-len`` tokens in, ``--output-len`` out, ``ignore_eos``) at each concurrency
and prints output tokens/s (and writes ``--json``, with the greedy tokens of
``--check-prompts`` fixed prompts, the same for every layout), with the pipeline's bubble measured and
predicted when ``--pp`` > 1; the other ranks run the steps rank 0 broadcasts. Ranks are
laid out as TensorRT-LLM does: rank = stage * tp + tensor-parallel rank, so the ranks of a
stage share a node. NCCL on GPUs, gloo on CPUs.
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
from kiln.runtime.pipeline import PipelineStats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a checkpoint directory or an engine directory")
    parser.add_argument("--tp", type=int, default=None, help="tensor-parallel ranks (default: WORLD_SIZE / pp)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel stages")
    parser.add_argument("--microbatches", type=int, default=None, help="per step (default: one per stage)")
    parser.add_argument("--target", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--engine-dir", default=None, help="where rank 0 builds the engine (default: under /tmp)")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--num-blocks", type=int, default=None,
                        help="KV-cache blocks of 16 (default: what the batch needs)")
    parser.add_argument("--cuda-graphs", default="all", choices=("all", "lazy", "off"),
                        help="decode steps replayed from CUDA graphs (RuntimeConfig.cuda_graphs)")
    parser.add_argument("--check-prompts", type=int, default=4,
                        help="fixed random prompts whose greedy tokens go into --json, to compare layouts")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    args.tp = args.tp or max(1, world // args.pp)
    if world != args.tp * args.pp:
        raise SystemExit(f"--tp {args.tp} --pp {args.pp} needs {args.tp * args.pp} processes; {world} are running "
                         "(start them with torchrun)")
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
    directory = args.engine_dir or f"/tmp/kiln-parallel-{Path(args.model).name}-tp{args.tp}-pp{args.pp}"
    if rank == 0:
        max_seq_len = args.input_len + args.output_len
        kiln.compile(args.model, target=args.target, dtype=args.dtype, tp=args.tp, pp=args.pp,
                     max_batch_size=max(args.concurrency), max_seq_len=max_seq_len).save(directory)
    if world > 1:
        dist.barrier()
    return directory


def _bench(args, directory: str, device: torch.device) -> None:
    engine = kiln.load(directory)
    blocks = args.num_blocks or max(args.concurrency) * -(-(args.input_len + args.output_len) // 16)
    llm = kiln.LLM(engine, RuntimeConfig(device=str(device), num_blocks=blocks, microbatches=args.microbatches,
                                         cuda_graphs=args.cuda_graphs))
    parallel = engine.info.tp * engine.info.pp > 1
    vocab = engine.vocab_size
    params = kiln.SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    llm.generate([torch.randint(0, vocab, (args.input_len,), generator=gen).tolist()], params)  # warm-up
    fixed = torch.Generator().manual_seed(1)  # the same prompts in every run, whatever the layout
    checks = [torch.randint(0, vocab, (args.input_len,), generator=fixed).tolist() for _ in range(args.check_prompts)]
    greedy = [o.token_ids for o in llm.generate(checks, params)] if checks else []
    results = []
    for concurrency in args.concurrency:
        prompts = [torch.randint(0, vocab, (args.input_len,), generator=gen).tolist() for _ in range(concurrency)]
        before = llm.pipeline_stats() if parallel else None
        start = time.perf_counter()
        outputs = llm.generate(prompts, params)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.token_ids) for o in outputs)
        result = {"tp": args.tp, "pp": args.pp, "concurrency": concurrency, "output_tokens": tokens,
                  "seconds": seconds, "output_tokens_per_s": tokens / seconds}
        line = f"tp={args.tp} pp={args.pp} concurrency={concurrency}: {tokens / seconds:,.1f} output tok/s"
        if parallel:
            stats = _since(before, llm.pipeline_stats())
            result.update(bubble=stats.bubble, predicted_bubble=stats.predicted_bubble,
                          microbatches=stats.microbatches, stage_busy_s=list(stats.stage_busy_s))
            line += f", bubble {stats.bubble:.1%} (model: {stats.predicted_bubble:.1%})"
        results.append(result)
        print(f"{line} ({seconds:.2f} s)")
    llm.close()
    if args.json:
        report = {"device": str(device), "cuda_graphs": args.cuda_graphs, "results": results, "greedy": greedy}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


def _since(before: PipelineStats, after: PipelineStats) -> PipelineStats:
    """The stats of the steps between two readings."""
    steps = after.steps - before.steps
    split = (after.microbatches * after.steps - before.microbatches * before.steps) / max(steps, 1)
    return PipelineStats(steps, after.wall_s - before.wall_s,
                         tuple(a - b for a, b in zip(after.stage_busy_s, before.stage_busy_s)), split)


if __name__ == "__main__":
    main()
