"""Plot a ``bench/serving.py`` result: output tokens/s against concurrency for kiln and
its peers (x log-scaled), with the baseline's kiln curve beside them.

    python bench/plot.py RESULTS.json OUT.png [--baseline BASELINE.json | --no-baseline] [--baseline-peers]
                         [--lengths 128 128]

kiln's runs come in two passes; the second (every shape met before) is the solid line,
the first the dashed one. Records without lengths (the baseline's) count as 128/128.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

BASELINE = Path(__file__).resolve().parent / "results-2026-11-23-h100-baseline.json"
Series = dict[str, list[tuple[int, float]]]


def _lengths(entry: dict) -> tuple[int, int]:
    return entry.get("input_len", 128), entry.get("output_len", 128)


def throughput_series(results: list[dict], lengths: tuple[int, int], label_suffix: str = "") -> Series:
    """(concurrency, output tokens/s) of each system's throughput records at ``lengths``,
    sorted by concurrency; a kiln record's first pass is its own series."""
    series: Series = defaultdict(list)
    for entry in results:
        if entry.get("what") == "throughput" and _lengths(entry) == lengths:
            name = entry["system"] + (", first pass" if entry.get("pass") == 1 else "") + label_suffix
            series[name].append((entry["concurrency"], entry["output_tokens_per_s"]))
    return {name: sorted(points) for name, points in series.items()}


def common_lengths(results: list[dict]) -> tuple[int, int]:
    """The (input, output) lengths that most throughput records have."""
    counts = Counter(_lengths(e) for e in results if e.get("what") == "throughput")
    return counts.most_common(1)[0][0]


def plot(results_file: Path, out: Path, baseline_file: Path | None, lengths: tuple[int, int] | None,
         baseline_peers: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(results_file.read_text())
    lengths = lengths or common_lengths(data["results"])
    series = throughput_series(data["results"], lengths)
    if baseline_file is not None:
        baseline = json.loads(baseline_file.read_text())
        drawn = [e for e in baseline["results"] if baseline_peers or e["system"] == "kiln"]
        old = throughput_series(drawn, lengths, " (baseline)")
        series.update(old)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors: dict[str, str] = {}  # one per system; kiln's first pass and baseline share kiln's
    for name, points in series.items():
        xs, ys = zip(*points)
        system = name.split(",")[0].removesuffix(" (baseline)")
        color = colors.setdefault(system, f"C{len(colors)}")
        style = "--" if "first pass" in name else ":" if "baseline" in name else "-"
        ax.plot(xs, ys, style, color=color, marker="o", label=name)
    ticks = sorted({x for points in series.values() for x, _ in points})
    ax.set(xscale="log", yscale="log", xlabel=f"concurrent requests ({lengths[0]} prompt + {lengths[1]} new tokens)",
           ylabel="output tokens/s", title=f"serving throughput, {data['device']}")
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--baseline", type=Path, default=BASELINE, help="a serving_baseline.py result to draw beside")
    parser.add_argument("--no-baseline", action="store_true", help="draw no baseline")
    parser.add_argument("--baseline-peers", action="store_true",
                        help="also draw the baseline run's peers (when this run has none)")
    parser.add_argument("--lengths", type=int, nargs=2, default=None, metavar=("INPUT", "OUTPUT"),
                        help="the workload to plot (default: the one most runs have)")
    args = parser.parse_args()
    plot(args.results, args.out, None if args.no_baseline else args.baseline,
         tuple(args.lengths) if args.lengths else None, args.baseline_peers)


if __name__ == "__main__":
    main()
