"""Plot ``bench/quantization.py`` results: each scheme's output tokens/s as a multiple of
kiln bf16 in the same run, one group of bars per workload (second passes), with the
issue's must-reach figures drawn as marks.

    python bench/plot_quantization.py OUT.png RESULTS.json [RESULTS.json ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MUST_REACH = {("int8", 1): 1.5, ("fp8", 1): 1.5, ("int4", 1): 2.2, ("fp8", 256): 1.4, ("fp8+kv-fp8", 256): 1.4}


def second_passes(paths: list[Path]) -> dict[tuple[str, int], float]:
    """(scheme, concurrency) -> output tokens/s of the second pass of 128/128."""
    rates = {}
    for path in paths:
        for r in json.loads(path.read_text())["results"]:
            if r.get("what") == "throughput" and r["pass"] == 2 and (r["input_len"], r["output_len"]) == (128, 128):
                rates[(r["scheme"], r["concurrency"])] = r["output_tokens_per_s"]
    return rates


def plot(rates: dict[tuple[str, int], float], out: Path) -> None:
    """Bars of speed-up over bf16 per concurrency, labelled with tokens/s."""
    concurrencies = sorted({c for _, c in rates})
    schemes = [s for s in ("int8", "int4", "fp8", "fp8+kv-fp8") if any((s, c) in rates for c in concurrencies)]
    fig, axes = plt.subplots(1, len(concurrencies), figsize=(5 * len(concurrencies), 4), squeeze=False)
    for ax, concurrency in zip(axes[0], concurrencies):
        base = rates[("none", concurrency)]
        shown = [s for s in schemes if (s, concurrency) in rates]
        ratios = [rates[(s, concurrency)] / base for s in shown]
        bars = ax.bar(shown, ratios, color="tab:blue")
        for bar, s in zip(bars, shown):
            ax.annotate(f"{rates[(s, concurrency)]:,.0f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
            if (s, concurrency) in MUST_REACH:
                ax.hlines(MUST_REACH[(s, concurrency)], bar.get_x(), bar.get_x() + bar.get_width(), colors="red")
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_title(f"128/128, {concurrency} concurrent (bf16: {base:,.0f} tok/s)")
        ax.set_ylabel("output tok/s, multiple of kiln bf16")
    fig.suptitle("kiln quantized engines against kiln bf16 (red: the issue's must-reach)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("results", type=Path, nargs="+")
    args = parser.parse_args()
    plot(second_passes(args.results), args.out)


if __name__ == "__main__":
    main()
