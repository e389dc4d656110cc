"""The ``kiln`` command.

``kiln`` alone runs the main job: compile the bundled tiny model and generate from a
prompt. ``kiln ir FILE_OR_MODEL`` parses and verifies a graph in kiln's text form (or
imports a checkpoint directory), optionally runs a pipeline, and prints text or DOT.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .frontends import FrontendError
from .ir import Graph, ParseError, VerificationError, parse, to_dot, verify
from .passes import PASSES, PIPELINES, PassError, format_records, pipeline_manager

BUNDLED_MODEL = Path(__file__).resolve().parent / "models"


def _main_job(args: argparse.Namespace) -> int:
    from .api import compile

    start = time.perf_counter()
    engine = compile(str(BUNDLED_MODEL), max_seq_len=1024)
    print(f"compiled the bundled {engine.info.architecture} for {engine.info.target} "
          f"({len(engine.graph.nodes)} nodes) in {time.perf_counter() - start:.1f} s")
    result = engine.generate(args.prompt, max_new_tokens=args.max_tokens)
    print(f"\n{args.prompt}{result.text}\n")
    print(f"{len(result.token_ids)} tokens in {result.seconds:.2f} s: {result.tokens_per_second:.1f} tokens/s "
          "(greedy, full recompute per token)")
    return 0


def _load_graph(source: str) -> Graph:
    if source != "-" and Path(source).is_dir():
        from .frontends.huggingface import load_checkpoint

        return load_checkpoint(source).graph
    graph = parse(sys.stdin.read() if source == "-" else Path(source).read_text())
    verify(graph)
    return graph


def _ir(args: argparse.Namespace) -> int:
    graph = _load_graph(args.source)
    if args.after and not args.pipeline:
        raise ValueError("--after needs --pipeline")
    if args.pipeline:
        dumps: list[str] = []
        manager = pipeline_manager(args.pipeline, debug=True, dump_after=args.after or (),
                                   dump=lambda name, g: dumps.append(_render(g, args.format, f"after {name}")))
        records = manager.run(graph)
        if args.timing:
            print(format_records(records), file=sys.stderr)
        if args.after:
            print("\n".join(dumps), end="")
            return 0
    print(_render(graph, args.format, None), end="")
    return 0


def _render(graph: Graph, fmt: str, title: str | None) -> str:
    if fmt == "dot":
        return to_dot(graph)
    return (f"// {title}\n" if title else "") + str(graph)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description="kiln: compile LLMs for fast inference. "
                                     "Without a command: compile the bundled tiny model and generate text.")
    parser.add_argument("--prompt", default="The for statement", help="prompt of the main job")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens the main job generates")
    commands = parser.add_subparsers(dest="command")
    ir = commands.add_parser("ir", help="print a graph (a .kiln text file or a checkpoint directory), "
                             "optionally after a pipeline")
    ir.add_argument("source", help="a .kiln text file, - for standard input, or a Hugging Face checkpoint directory")
    ir.add_argument("--pipeline", choices=sorted(PIPELINES), help="run this pipeline first")
    ir.add_argument("--after", action="append", choices=sorted(PASSES), metavar="PASS",
                    help="print the graph after this pass of the pipeline (repeatable)")
    ir.add_argument("--format", choices=("text", "dot"), default="text")
    ir.add_argument("--timing", action="store_true", help="print per-pass changes and times to stderr")
    ir.set_defaults(run=_ir)
    parser.set_defaults(run=_main_job)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kiln`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ParseError, VerificationError, PassError, FrontendError, ValueError, OSError) as exc:
        print(f"kiln{' ' + args.command if args.command else ''}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
