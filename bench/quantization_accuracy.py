"""Accuracy of each quantization scheme against the unquantized model, on the CPU:
perplexity on held-out text and next-token agreement (how often the quantized model's
most likely next token is the unquantized model's), plus the largest logit difference.

    python bench/quantization_accuracy.py                        # the bundled model
    python bench/quantization_accuracy.py --model DIR --json out.json
    python bench/quantization_accuracy.py --variants int4_gptq int4_awq --calibration-count 8
    python bench/quantization_accuracy.py --model DIR --variants "fp8 (static)" --skip "model.layers.29.*"

Text: the Python documentation topics the bundled model was not trained on
(``tools/train_tiny_model.py``'s split), cut into windows of ``--window`` tokens; with
``--split train``, the topics it was trained on (the 2M-parameter bundled model has
memorized those: perplexity about 1.4, against about 1,900 on held-out topics). The
calibrated schemes calibrate on ``--calibration-count`` of the topics that are not held
out (``kiln.passes.quantization.default_corpus``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

import kiln  # noqa: E402
from kiln.passes import QuantConfig  # noqa: E402
from kiln.passes.quantization import default_corpus  # noqa: E402

VARIANTS = {  # name -> compile options
    "int8": dict(quantization="int8"),
    "int4 (g128, asym)": dict(quantization="int4"),
    "int4 (g128, sym)": dict(quantization=QuantConfig("int4", symmetric=True)),
    "int4 (g64, asym)": dict(quantization=QuantConfig("int4", group_size=64)),
    "fp8": dict(quantization="fp8"),
    "fp8 (static)": dict(quantization=QuantConfig("fp8", activations="static")),
    "fp8 + fp8 KV cache": dict(quantization="fp8", kv_cache_dtype="fp8"),
    "fp8 KV cache only": dict(kv_cache_dtype="fp8"),
    "int4_gptq (g128, asym)": dict(quantization="int4_gptq"),
    "int4_gptq (g128, asym, act-order)": dict(quantization=QuantConfig("int4_gptq", act_order=True)),
    "int4_awq (g128, asym)": dict(quantization="int4_awq"),
    "w8a8_sq (alpha 0.5)": dict(quantization="w8a8_sq"),
}


def text_windows(tokenizer, window: int, count: int, split: str = "held-out") -> torch.Tensor:
    """``count`` windows of ``window`` tokens of documentation, ``[count, window]``."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    held_out = set(names[::20])
    text = "\n\n".join(topics[n] for n in names if (n in held_out) == (split == "held-out"))
    ids = tokenizer(text)["input_ids"]
    if len(ids) < window * count:
        raise ValueError(f"the {split} text has {len(ids)} tokens, fewer than {count} x {window}")
    return torch.tensor(ids[: window * count]).view(count, window)


def evaluate(engine, windows: torch.Tensor, batch: int = 4) -> torch.Tensor:
    """The logits of every window, ``[count, window, vocab]``, float32."""
    return torch.cat([engine.logits(windows[i:i + batch]).float() for i in range(0, len(windows), batch)])


def perplexity(logits: torch.Tensor, windows: torch.Tensor) -> float:
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten())
    return math.exp(loss.item())


def _selected(name: str, wanted: list[str]) -> bool:
    """Whether ``name`` is one of ``wanted``, or starts with one that is no variant's whole name."""
    return name in wanted or any(name.startswith(w) and w not in VARIANTS for w in wanted)


def _with_options(variant: dict, skip, alpha: float | None) -> dict:
    """``variant``'s compile options with the layers to ``skip`` and SmoothQuant's ``alpha``."""
    if variant.get("quantization") is None:
        return variant
    config = QuantConfig.of(variant["quantization"])
    options = {"skip": (*config.skip, *skip)}
    if alpha is not None and config.scheme == "w8a8_sq":
        options["alpha"] = alpha
    return {**variant, "quantization": dataclasses.replace(config, **options)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(Path(kiln.__file__).parent / "models"))
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--split", choices=("held-out", "train"), default="held-out")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--variants", nargs="+", metavar="PREFIX", default=None,
                        help="only these variants, or those whose name starts with one of these (default: all)")
    parser.add_argument("--calibration-count", type=int, default=16,
                        help="documentation topics the calibrated schemes calibrate on")
    parser.add_argument("--skip", nargs="+", metavar="GLOB", default=(),
                        help="layers every quantized variant keeps in high precision (QuantConfig.skip)")
    parser.add_argument("--alpha", type=float, default=None, help="SmoothQuant's migration strength for w8a8_sq")
    args = parser.parse_args()
    options = dict(max_batch_size=4, max_seq_len=args.window + 1, max_num_tokens=4 * args.window)
    base = kiln.compile(args.model, **options)
    windows = text_windows(base.tokenizer, args.window, args.count, args.split)
    reference = evaluate(base, windows)
    rows = [{"variant": "unquantized", "perplexity": perplexity(reference, windows), "agreement": 1.0,
             "max_logit_error": 0.0}]
    calibration = default_corpus(args.calibration_count)
    for name, variant in VARIANTS.items():
        if args.variants and not _selected(name, args.variants):
            continue
        start = time.perf_counter()
        variant = _with_options(variant, args.skip, args.alpha)
        quantization = variant.get("quantization")
        calibrated = quantization is not None and quantization.calibrated
        engine = kiln.compile(args.model, **options, **variant, **({"calibration": calibration} if calibrated else {}))
        logits = evaluate(engine, windows)
        rows.append({"variant": name, "perplexity": perplexity(logits, windows),
                     "agreement": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item(),
                     "max_logit_error": (logits - reference).abs().max().item()})
        print(f"{name}: {time.perf_counter() - start:.1f} s, perplexity {rows[-1]['perplexity']:.3f}, "
              f"agreement {rows[-1]['agreement']:.2%}", file=sys.stderr)
    print(f"{args.model}: {args.count} {args.split} windows of {args.window} tokens")
    print(f"| variant | perplexity | vs unquantized | next-token agreement | max logit error |")
    print("|---|---|---|---|---|")
    for r in rows:
        change = r["perplexity"] / rows[0]["perplexity"] - 1
        print(f"| {r['variant']} | {r['perplexity']:.3f} | {change:+.2%} | {r['agreement']:.2%} | "
              f"{r['max_logit_error']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "split": args.split, "window": args.window,
                                               "count": args.count, "calibration_count": args.calibration_count,
                                               "skip": list(args.skip), "alpha": args.alpha, "rows": rows},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
