"""Plot a ``serving_baseline.py`` result: output tokens/s against concurrency per system.

    python bench/plot_baseline.py RESULTS.json OUT.png
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(results: str, out: str) -> None:
    data = json.loads(Path(results).read_text())
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for entry in data["results"]:
        if entry.get("what") == "throughput":
            series[entry["system"]].append((entry["concurrency"], entry["output_tokens_per_s"]))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for system, points in series.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=system)
    ax.set(xscale="log", yscale="log", xlabel="concurrent requests (128 prompt + 128 new tokens)",
           ylabel="output tokens/s", title=f"Llama-3.1-8B shape, bf16, {data['device']}")
    ax.set_xticks([1, 4, 16, 64], ["1", "4", "16", "64"])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main(*sys.argv[1:3])
