"""The ``kiln`` command.

``kiln`` alone runs the main job: build the bundled tiny model and generate from a
prompt. ``kiln build MODEL -o DIR`` writes an engine directory; ``kiln generate`` and
``kiln serve`` take an engine directory (loaded) or a checkpoint directory (built
first). ``kiln ir FILE_OR_MODEL`` parses and verifies a graph in kiln's text form (or
imports a checkpoint directory), optionally runs a pipeline, and prints text or DOT.
``kiln export MODEL --format onnx -o FILE`` writes the step graph as ONNX.
``kiln bench`` serves random prompts at several concurrencies and reports throughput,
latency percentiles and the fractions of the device's limits.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .api import TARGETS
from .frontends import FrontendError
from .ir import Graph, ParseError, VerificationError, parse, to_dot, verify
from .passes import PASSES, PIPELINES, PassError, QuantConfig, format_records, pipeline_manager
from .passes.quantization import SCHEMES
from .runtime import EngineLoadError

BUNDLED_MODEL = Path(__file__).resolve().parent / "models"


def _main_job(args: argparse.Namespace) -> int:
    from .api import LLM, compile

    start = time.perf_counter()
    engine = compile(str(BUNDLED_MODEL), max_batch_size=16, max_seq_len=1024, progress=True)
    print(f"built the bundled {engine.info.architecture} for {engine.info.target} "
          f"({len(engine.graph.nodes)} nodes) in {time.perf_counter() - start:.1f} s")
    return _generate_with(LLM(engine), args)


def _generate(args: argparse.Namespace) -> int:
    from .api import LLM
    from .runtime import RuntimeConfig

    start = time.perf_counter()
    llm = LLM(args.model, RuntimeConfig(device=args.device), progress=True)
    print(f"ready in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return _generate_with(llm, args)


def _generate_with(llm, args: argparse.Namespace) -> int:
    from .runtime import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    start = time.perf_counter()
    print(f"\n{args.prompt}", end="", flush=True)
    final = None
    for output in llm.stream(args.prompt, params):
        print(output.delta_text, end="", flush=True)
        final = output
    seconds = time.perf_counter() - start
    print(f"\n\n{len(final.token_ids)} tokens in {seconds:.2f} s: {len(final.token_ids) / seconds:.1f} tokens/s "
          f"(finish: {final.finish_reason})")
    return 0


def _build(args: argparse.Namespace) -> int:
    from .api import compile

    start = time.perf_counter()
    engine = compile(args.model, target=args.target, dtype=args.dtype, max_batch_size=args.max_batch_size,
                     max_seq_len=args.max_seq_len, max_num_tokens=args.max_num_tokens, tp=args.tp, pp=args.pp,
                     quantization=_quantization(args), kv_cache_dtype=args.kv_cache_dtype, progress=True,
                     calibration=_calibration_texts(args))
    built = time.perf_counter()
    engine.save(args.output)
    print(f"built {engine.info.architecture} for {engine.info.target} in {built - start:.1f} s; "
          f"saved to {args.output} in {time.perf_counter() - built:.1f} s")
    return 0


def _torchrun_worker(args: argparse.Namespace) -> bool:
    """Under torchrun: join the world; True for a rank other than 0, which has served rank
    0's steps until it stopped them. Rank 0 goes on, on its device (``args.device``)."""
    from .runtime.distributed import join_torchrun

    joined = join_torchrun(args.model, args.device)
    if joined is None:
        return False
    rank, device = joined
    args.device = str(device)
    return rank != 0


def _serve(args: argparse.Namespace) -> int:
    from .api import as_engine
    from .runtime import RuntimeConfig
    from .runtime.admission import ServerLimits
    from .runtime.async_llm import AsyncLLM
    from .runtime.llm_engine import LLMEngine
    from .runtime.distributed import leave_world
    from .runtime.server import create_app
    from .runtime.serving import run_server

    if _torchrun_worker(args):
        return 0
    start = time.perf_counter()
    parallel = {name: getattr(args, name) for name in ("tp", "pp") if getattr(args, name)}
    engine = as_engine(args.model, progress=True, **parallel)
    for name, ranks in parallel.items():
        if getattr(engine.info, name) != ranks:
            raise ValueError(f"engine {args.model} was built for {name}={getattr(engine.info, name)}, not "
                             f"--{name} {ranks}: rebuild it")
    runtime = RuntimeConfig(device=args.device, num_blocks=args.num_blocks, memory_fraction=args.memory_fraction,
                            max_num_seqs=args.max_num_seqs, prefix_caching=not args.no_prefix_caching,
                            prefill_workers=args.prefill_workers)
    llm = AsyncLLM(LLMEngine(engine, runtime))
    name = args.model_name or Path(args.model).name
    limits = ServerLimits(max_queued=args.max_queued, request_timeout=args.request_timeout or None,
                          max_body_bytes=args.max_body_bytes, drain_timeout=args.drain_timeout)
    app = create_app(llm, name, args.api_key, args.default_max_tokens, limits, args.allowed_origin)
    llm.start()
    print(f"serving {name} ({engine.info.architecture}, {engine.info.target}) on http://{args.host}:{args.port} "
          f"after {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    try:
        run_server(app, args.host, args.port, limits.drain_timeout)
    finally:
        llm.shutdown()
        leave_world()
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .runtime.distributed import leave_world

    if _torchrun_worker(args):
        return 0
    try:
        return _bench_rank0(args)
    finally:
        leave_world()


def _bench_rank0(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    import torch

    from .runtime import LLMEngine, RuntimeConfig
    from .runtime.benchmark import (cache_blocks, decode_bytes, engine_options, format_report, hardware_limits,
                                    run_benchmark)
    from .api import as_engine

    most, length = max(args.concurrency), args.input_len + args.output_len
    options = engine_options(args.input_len, args.output_len, most)
    options["max_seq_len"] = args.max_seq_len or options["max_seq_len"]
    target = args.target or ("cuda" if torch.cuda.is_available() else "cpu")
    engine = as_engine(args.model, target=target, dtype=args.dtype, quantization=_quantization(args),
                       kv_cache_dtype=args.kv_cache_dtype, progress=not args.json,
                       calibration=_calibration_texts(args), **options)
    info = engine.info
    if info.max_batch_size < most or info.max_seq_len < length:
        raise ValueError(f"the engine serves {info.max_batch_size} sequences of {info.max_seq_len} tokens; the runs "
                         f"need {most} of {length}")
    num_blocks = cache_blocks(args.input_len, args.output_len, most)
    llm_engine = LLMEngine(engine, RuntimeConfig(device=args.device, num_blocks=num_blocks))
    limits = hardware_limits(llm_engine.device)
    results = [run_benchmark(llm_engine, args.input_len, args.output_len, c, args.seed, limits, args.full_warmup)
               for c in args.concurrency]
    dtype, step_bytes = str(info.dtype).removeprefix("torch."), decode_bytes(engine)
    if args.json:
        print(json.dumps({"model": str(args.model), "architecture": info.architecture, "target": info.target,
                          "dtype": dtype, "quantization": info.quantization, "kv_cache_dtype": info.kv_cache_dtype,
                          "device": str(llm_engine.device), "max_batch_size": info.max_batch_size,
                          "max_seq_len": info.max_seq_len, "max_num_tokens": info.max_num_tokens,
                          "num_blocks": num_blocks, "decode_bytes": step_bytes, "hardware": asdict(limits),
                          "runs": [r.to_dict() for r in results]}, indent=2))
    else:
        print(f"{info.architecture} ({info.target}, {dtype}) on {limits.device}: {args.input_len} prompt + "
              f"{args.output_len} new tokens a request, greedy")
        print(format_report(results, limits, step_bytes))
    return 0


def _export(args: argparse.Namespace) -> int:
    from .api import as_engine

    start = time.perf_counter()
    engine = as_engine(args.model, target=args.target, max_batch_size=args.max_batch_size,
                       max_seq_len=args.max_seq_len, progress=True)
    engine.export_onnx(args.output)
    print(f"exported the step graph of {engine.info.architecture} ({len(engine.graph.nodes)} nodes) as ONNX "
          f"to {args.output} in {time.perf_counter() - start:.1f} s")
    return 0


def _load_graph(source: str) -> tuple[Graph, Any]:
    """The graph, and for a checkpoint directory its tokenizer (None for text)."""
    if source != "-" and Path(source).is_dir():
        from .frontends.huggingface import load_checkpoint

        imported = load_checkpoint(source)
        return imported.graph, imported.tokenizer
    if source.endswith(".gguf"):
        from .frontends.gguf import load_gguf

        imported = load_gguf(source)
        return imported.graph, imported.tokenizer
    graph = parse(sys.stdin.read() if source == "-" else Path(source).read_text())
    verify(graph)
    return graph, None


def _ir(args: argparse.Namespace) -> int:
    graph, tokenizer = _load_graph(args.source)
    if args.after and not args.pipeline:
        raise ValueError("--after needs --pipeline")
    pipeline = args.pipeline or ("reference" if args.quantization else None)  # a quantized graph is a pipeline's
    if pipeline:
        dumps: list[str] = []
        quantization = _quantization(args)
        calibration = ()
        if quantization is not None and quantization.calibrated:
            from .api import calibration_batches

            calibration = calibration_batches(tokenizer, _calibration_texts(args), 512)
        manager = pipeline_manager(pipeline, quantization, args.kv_cache_dtype, calibration, debug=True,
                                   dump_after=args.after or (),
                                   dump=lambda name, g: dumps.append(_render(g, args.format, f"after {name}")))
        records = manager.run(graph)
        if args.timing:
            print(format_records(records), file=sys.stderr)
        if args.after:
            print("\n".join(dumps), end="")
            return 0
    print(_render(graph, args.format, None), end="")
    return 0


def _quantization(args: argparse.Namespace) -> QuantConfig | None:
    if not args.quantization:
        return None
    return QuantConfig(args.quantization, group_size=args.group_size, symmetric=args.symmetric,
                       lm_head=args.quantize_lm_head, skip=tuple(args.quantize_skip or ()),
                       activations=args.activations, act_order=args.act_order, damp=args.damp,
                       clip=not args.no_clip, alpha=args.alpha)


def _calibration_texts(args: argparse.Namespace) -> list[str] | None:
    """The calibration text a calibrated scheme needs: that many of Python's documentation topics."""
    quantization = _quantization(args)
    if quantization is None or not quantization.calibrated:
        return None
    from .passes.quantization import default_corpus

    return default_corpus(args.calibration_samples)


def _quantization_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantization", choices=sorted(SCHEMES), default=None,
                        help="quantize the linear layers: " + "; ".join(f"{k}: {v}" for k, v in SCHEMES.items()))
    parser.add_argument("--quantize-skip", action="append", metavar="PATTERN",
                        help="keep the layers whose module path matches this glob in high precision (repeatable)")
    parser.add_argument("--quantize-lm-head", action="store_true", help="quantize the LM head too")
    parser.add_argument("--group-size", type=int, default=128, help="input features per INT4 scale")
    parser.add_argument("--symmetric", action="store_true", help="INT4 with zero point 8 (default: asymmetric)")
    parser.add_argument("--activations", choices=("dynamic", "static"), default="dynamic",
                        help="FP8 input scales: per token at run time, or per layer calibrated on Python's docs")
    parser.add_argument("--calibration-samples", type=int, default=64, metavar="N",
                        help="calibrated schemes: run the model on N topics of Python's documentation")
    parser.add_argument("--act-order", action="store_true",
                        help="int4_gptq: quantize columns in order of decreasing Hessian diagonal")
    parser.add_argument("--damp", type=float, default=0.01,
                        help="int4_gptq: dampening added to the Hessian, a fraction of its mean diagonal")
    parser.add_argument("--no-clip", action="store_true", help="int4_awq: no search for clipped weight ranges")
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="w8a8_sq: migration strength, how much of the activations' range moves to the weights")
    parser.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                        help="the KV cache's dtype: the model's (auto) or E4M3 (fp8)")


def _render(graph: Graph, fmt: str, title: str | None) -> str:
    if fmt == "dot":
        return to_dot(graph)
    return (f"// {title}\n" if title else "") + str(graph)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description="kiln: compile LLMs for fast inference. "
                                     "Without a command: compile the bundled tiny model and generate text.")
    _sampling_options(parser)
    commands = parser.add_subparsers(dest="command")
    build = commands.add_parser("build", help="build an engine directory from a checkpoint directory")
    build.add_argument("model", help="a Hugging Face checkpoint directory or a llama.cpp .gguf file")
    build.add_argument("-o", "--output", required=True, help="the engine directory to write")
    build.add_argument("--target", default="cpu", choices=sorted(TARGETS))
    build.add_argument("--dtype", default=None, help="weights and activations dtype (default: the checkpoint's)")
    build.add_argument("--max-batch-size", type=int, default=64)
    build.add_argument("--max-seq-len", type=int, default=2048)
    build.add_argument("--max-num-tokens", type=int, default=None, help="tokens per step (default: max-seq-len)")
    build.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (one weights file each)")
    build.add_argument("--pp", type=int, default=1, help="pipeline-parallel stages")
    _quantization_options(build)
    build.set_defaults(run=_build)
    generate = commands.add_parser("generate", help="generate text from an engine or checkpoint directory")
    generate.add_argument("model", help="an engine directory, a checkpoint directory or a .gguf file")
    generate.add_argument("--device", default=None, help="cpu or cuda (default: the engine's target)")
    _sampling_options(generate)
    generate.set_defaults(run=_generate)
    serve = commands.add_parser("serve", help="serve an engine or checkpoint directory over an OpenAI-compatible "
                                "HTTP API")
    serve.add_argument("model", help="an engine directory, a checkpoint directory or a .gguf file")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help="require this bearer token on every route but /health")
    serve.add_argument("--model-name", default=None, help="the model's name in the API (default: the directory's)")
    serve.add_argument("--device", default=None, help="cpu or cuda (default: the engine's target)")
    serve.add_argument("--num-blocks", type=int, default=None, help="KV-cache blocks (default: from free memory)")
    serve.add_argument("--memory-fraction", type=float, default=0.9,
                       help="fraction of device memory for weights and KV cache")
    serve.add_argument("--max-num-seqs", type=int, default=None, help="cap on running sequences")
    serve.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request gives none")
    serve.add_argument("--no-prefix-caching", action="store_true", help="turn prefix reuse off")
    serve.add_argument("--max-queued", type=int, default=256,
                       help="requests admitted beyond the running batch before new ones get 429")
    serve.add_argument("--request-timeout", type=float, default=600, help="seconds a request may take (0: no limit)")
    serve.add_argument("--max-body-bytes", type=int, default=4 << 20, help="largest request body (413 beyond)")
    serve.add_argument("--drain-timeout", type=float, default=30,
                       help="seconds SIGTERM waits for requests in flight while new ones get 503")
    serve.add_argument("--allowed-origin", action="append", default=[],
                       help="a browser origin allowed to call the API (CORS; repeatable; default: none)")
    serve.add_argument("--tp", type=int, default=None,
                       help="tensor-parallel ranks, each a worker process (default: the engine's)")
    serve.add_argument("--pp", type=int, default=None,
                       help="pipeline-parallel stages, each a worker process per tensor-parallel rank "
                       "(default: the engine's)")
    serve.add_argument("--prefill-workers", type=int, default=0,
                       help="disaggregated serving: prompts prefilled by this many workers (each of the engine's "
                       "tp x pp processes), their KV cache sent back layer by layer (default: 0, prefill here)")
    serve.set_defaults(run=_serve)
    ir = commands.add_parser("ir", help="print a graph (a .kiln text file or a checkpoint directory), "
                             "optionally after a pipeline")
    ir.add_argument("source", help="a .kiln text file, - for standard input, a Hugging Face checkpoint directory "
                    "or a .gguf file")
    ir.add_argument("--pipeline", choices=sorted(PIPELINES),
                    help="run this pipeline first (with --quantization: reference unless named)")
    ir.add_argument("--after", action="append", choices=sorted({*PASSES, "quantize", "fp8_kv_cache"}), metavar="PASS",
                    help="print the graph after this pass of the pipeline (repeatable)")
    ir.add_argument("--format", choices=("text", "dot"), default="text")
    ir.add_argument("--timing", action="store_true", help="print per-pass changes and times to stderr")
    _quantization_options(ir)
    ir.set_defaults(run=_ir)
    export = commands.add_parser("export", help="export a model's step graph (the KV caches in and out) as ONNX")
    export.add_argument("model", help="an engine directory or a checkpoint directory")
    export.add_argument("--format", choices=("onnx",), default="onnx")
    export.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    export.add_argument("--target", default="cpu", choices=sorted(TARGETS),
                        help="the pipeline a checkpoint is compiled with (its KV-cache layout)")
    export.add_argument("--max-batch-size", type=int, default=64)
    export.add_argument("--max-seq-len", type=int, default=2048)
    export.set_defaults(run=_export)
    bench = commands.add_parser(
        "bench", help="measure serving throughput and latency against the device's limits",
        description="Serve fresh random prompts (greedy, ignore_eos) at each concurrency, all submitted at once, "
        "and report output and total tokens/s, time to first token and inter-token latency percentiles, and the "
        "fractions of the memory bandwidth and matmul rate measured in the same run. A checkpoint directory is "
        "compiled with limits that fit the runs; an engine directory must already fit them.")
    bench.add_argument("model", help="an engine directory or a checkpoint directory")
    bench.add_argument("--input-len", type=int, default=128, help="prompt tokens a request")
    bench.add_argument("--output-len", type=int, default=128, help="new tokens a request")
    bench.add_argument("--concurrency", type=int, nargs="+", default=[1, 64, 256],
                       help="requests submitted at once; one run each")
    bench.add_argument("--target", default=None, choices=sorted(TARGETS),
                       help="compile for this target (default: cuda when a GPU is there, else cpu)")
    bench.add_argument("--dtype", default=None, help="weights and activations dtype (default: the checkpoint's)")
    bench.add_argument("--max-seq-len", type=int, default=None,
                       help="the engine's max_seq_len (default: input-len + output-len)")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: the engine's target)")
    bench.add_argument("--full-warmup", action="store_true",
                       help="run each workload once untimed first, so the timed pass meets no new shape")
    bench.add_argument("--seed", type=int, default=0, help="seeds the random prompts")
    bench.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    _quantization_options(bench)
    bench.set_defaults(run=_bench)
    parser.set_defaults(run=_main_job)
    return parser


def _sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", default="The for statement", help="the prompt")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--seed", type=int, default=None)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kiln`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ParseError, VerificationError, PassError, FrontendError, EngineLoadError, ValueError, OSError,
            RuntimeError) as exc:
        print(f"kiln{' ' + args.command if args.command else ''}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
