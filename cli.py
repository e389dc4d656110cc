"""The ``kiln`` command.

``kiln`` alone runs the main job; ``kiln ir FILE`` parses, verifies and prints a graph
in kiln's text form, optionally after a named pipeline, as text or DOT.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .ir import ParseError, VerificationError, parse, to_dot, verify
from .passes import PASSES, PIPELINES, PassError, format_records, pipeline_manager


def _ir(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
    graph = parse(text)
    verify(graph)
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
    elif args.after:
        raise SystemExit("--after needs --pipeline")
    print(_render(graph, args.format, None), end="")
    return 0


def _render(graph, fmt: str, title: str | None) -> str:
    if fmt == "dot":
        return to_dot(graph)
    return (f"// {title}\n" if title else "") + str(graph)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description="kiln: compile LLMs for fast inference")
    commands = parser.add_subparsers(dest="command")
    ir = commands.add_parser("ir", help="parse, verify, transform and print a graph in kiln's text form")
    ir.add_argument("file", help="a .kiln text file, or - for standard input")
    ir.add_argument("--pipeline", choices=sorted(PIPELINES), help="run this pipeline first")
    ir.add_argument("--after", action="append", choices=sorted(PASSES), metavar="PASS",
                    help="print the graph after this pass of the pipeline (repeatable)")
    ir.add_argument("--format", choices=("text", "dot"), default="text")
    ir.add_argument("--timing", action="store_true", help="print per-pass changes and times to stderr")
    ir.set_defaults(run=_ir)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kiln`` console script."""
    args = build_parser().parse_args(argv)
    if args.command is None:
        from .demo import run_demo

        run_demo()
        return 0
    try:
        return args.run(args)
    except (ParseError, VerificationError, PassError, ValueError, OSError) as exc:
        print(f"kiln {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
