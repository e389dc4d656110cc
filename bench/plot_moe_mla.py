"""Plot ``bench/moe_layers.py`` and ``bench/mla_kernels.py`` results side by side: the
Mixtral-shaped stack's output tokens/s (kiln, transformers, the decode limit) per batch,
and each MLA case's share of the HBM bandwidth and of the bf16 matmul rate.

    python bench/plot_moe_mla.py MOE.json MLA.json OUT.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def plot(moe_file: Path, mla_file: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    moe = [r for r in json.loads(moe_file.read_text())["results"] if r.get("system") == "comparison"]
    mla = json.loads(mla_file.read_text())["results"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.27
    for i, (key, label) in enumerate((("kiln_output_tokens_per_s", "kiln"),
                                      ("transformers_output_tokens_per_s", "transformers eager"),
                                      ("decode_limit_tokens_per_s", "decode limit (HBM)"))):
        left.bar([j + (i - 1) * width for j in range(len(moe))], [r[key] for r in moe], width, label=label)
    left.set_xticks(range(len(moe)), [f"batch {r['batch']}" for r in moe])
    left.set(yscale="log", ylabel="output tokens/s", title="Mixtral-8x7B-shaped layers (4), bf16")
    left.legend(fontsize="small")
    cases = range(len(mla))
    right.bar([c - 0.2 for c in cases], [100 * r["bandwidth_fraction"] for r in mla], 0.4, label="% of HBM bandwidth")
    right.bar([c + 0.2 for c in cases], [100 * r["matmul_fraction"] for r in mla], 0.4, label="% of bf16 matmul rate")
    right.set_xticks(cases, [r["case"] for r in mla], rotation=25, ha="right", fontsize="small")
    right.set(ylabel="percent", title="MLA kernels, DeepSeek-V3 heads")
    right.legend(fontsize="small")
    for ax in (left, right):
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("moe", type=Path)
    parser.add_argument("mla", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    plot(args.moe, args.mla, args.out)


if __name__ == "__main__":
    main()
