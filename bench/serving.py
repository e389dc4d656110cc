"""The side-by-side serving benchmark on one GPU: kiln beside transformers, with the
device's limits measured in the same run.

The model is a Llama-3.1-8B-shaped model with random bf16 weights built here (no
download), or, with ``--model DIR``, a checkpoint directory (kiln compiles the directory;
transformers loads it). Prompts are fresh random token ids for every run (a repeated
prompt would hit kiln's prefix cache); generation is greedy with ``ignore_eos``. Parts
(``--parts``, all by default):

- ``kiln``: the build for ``--target`` and its time; ``--input-len`` prompt tokens and
  ``--output-len`` new ones at each ``--concurrency``, through
  ``kiln.runtime.benchmark.run_benchmark``, each in two passes with fresh prompts: the
  first pass meets each attention shape for the first time, the second meets none.
- ``long``: time to the first token of a fresh ``--long-len``-token prompt,
  ``--ttft-repeats`` times (each and the median); ``input-len``/``long-len`` and
  ``long-len``/``output-len`` at each ``--long-concurrency``.
- ``load``: ``engine.save(dir)``, ``kiln.load(dir)``, and the runtime's start on the
  loaded engine (weights to the device, KV cache, CUDA graphs), each timed.
- ``transformers``: transformers eager ``generate`` at each ``--transformers-concurrency``.
- ``static``: transformers with a static cache (its forward compiled with torch.compile)
  at each ``--static-concurrency``.
  Both are timed on their second call, the first call's time kept beside.

Each record is printed as one JSON line when it is measured, and ``--out`` is rewritten
after each, so that a killed run keeps what it measured. Plot with ``bench/plot.py``.
With the reference backend on an H100 the whole default run takes about ten minutes
(128/2048 alone two to three); ``--parts`` splits it.

    python bench/serving.py --out results.json
    python bench/serving.py --model smollm2-135m --parts kiln transformers --output-len 256 \\
        --concurrency 1 --transformers-concurrency 1 --out smollm2.json
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

import kiln
from kiln.runtime import LLMEngine, RuntimeConfig
from kiln.runtime.benchmark import (HardwareLimits, cache_blocks, decode_bytes, engine_options, hardware_limits,
                                    linear_weight_elements, prompt_vocabulary, random_prompts, run_benchmark, timed)

PARTS = ("kiln", "long", "load", "transformers", "static")
Record = Callable[[dict], None]


def llama_8b(device: str = "cuda"):
    """A Llama-3.1-8B-shaped model on ``device`` with random bf16 weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                         rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                         bos_token_id=128000, eos_token_id=128001)
    return random_model(LlamaForCausalLM, config, device)


def random_model(model_class, config, device: str, dtype: torch.dtype = torch.bfloat16):
    """``model_class(config)`` on ``device`` with random ``dtype`` weights (normal, std
    0.02; norms 1), made there directly (no copy of the weights in the host's memory)."""
    with torch.device("meta"):
        model = model_class(config).to(dtype)
    model = model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=generator)
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)  # to_empty left its buffers empty
    model.generation_config.pad_token_id = 0
    return model.eval()


def checkpoint_model(path: str, dtype: str, device: str):
    """The transformers model of checkpoint directory ``path``, in ``dtype`` on ``device``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = model.generation_config.eos_token_id
    return model


def transformers_vocabulary(model, path: str | None) -> list[int]:
    """The token ids random prompts for ``model`` draw from (its checkpoint's tokenizer
    decides the special tokens when there is one)."""
    tokenizer = None
    if path is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    config = model.config
    specials = [t for t in (config.bos_token_id, config.eos_token_id, config.pad_token_id) if isinstance(t, int)]
    return prompt_vocabulary(config.vocab_size, tokenizer, specials)


def bench_transformers(model, input_len: int, output_len: int, concurrencies: list[int], static: bool,
                       vocabulary: list[int], rng: random.Random, record: Record) -> None:
    """Greedy ``generate`` of ``output_len`` tokens for ``concurrency`` fresh prompts at
    once, timed on the second call (the first, timed too, compiles with ``static``)."""
    name = "transformers static+compile" if static else "transformers eager"
    extra = {"cache_implementation": "static"} if static else {}

    def run(ids: torch.Tensor) -> None:
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                           min_new_tokens=output_len, do_sample=False, **extra)

    for concurrency in concurrencies:
        first_ids, ids = (torch.tensor(random_prompts(concurrency, input_len, vocabulary, rng), device=model.device)
                          for _ in range(2))
        first = timed(lambda: run(first_ids), model.device)
        seconds = timed(lambda: run(ids), model.device)
        record({"system": name, "what": "throughput", "input_len": input_len, "output_len": output_len,
                "concurrency": concurrency, "output_tokens_per_s": concurrency * output_len / seconds,
                "seconds": seconds, "first_call_s": first})


def kiln_workloads(args: argparse.Namespace) -> list[tuple[int, int, int]]:
    """(input_len, output_len, concurrency) of every kiln run the chosen parts make."""
    runs = [(args.input_len, args.output_len, 1)]
    if "kiln" in args.parts:
        runs += [(args.input_len, args.output_len, c) for c in args.concurrency]
    if "long" in args.parts:
        runs.append((args.long_len, 1, 1))
        for c in args.long_concurrency:
            runs += [(args.input_len, args.long_len, c), (args.long_len, args.output_len, c)]
    return runs


def bench_kiln(source, args: argparse.Namespace, limits: HardwareLimits, record: Record) -> None:
    """Build kiln's engine from ``source`` (a model or a checkpoint directory) with limits
    that fit every run of the chosen parts, and run them."""
    runs = kiln_workloads(args)
    options = {key: max(engine_options(*run)[key] for run in runs) for key in engine_options(1, 1, 1)}
    start = time.perf_counter()
    engine = kiln.compile(source, target=args.target, dtype=args.dtype, **options)
    record({"system": "kiln", "what": "build", "seconds": time.perf_counter() - start, "target": args.target,
            "nodes": len(engine.graph.nodes), "decode_bytes": decode_bytes(engine),
            "linear_parameters": linear_weight_elements(engine), **options})
    llm_engine = LLMEngine(engine, RuntimeConfig(num_blocks=max(cache_blocks(*run) for run in runs)))

    def measure(input_len: int, output_len: int, concurrency: int, passes: int) -> None:
        for number in range(1, passes + 1):
            result = run_benchmark(llm_engine, input_len, output_len, concurrency, args.seed, limits)
            record({"system": "kiln", "what": "throughput", "pass": number, **result.to_dict()})

    if "kiln" in args.parts:
        for concurrency in args.concurrency:
            measure(args.input_len, args.output_len, concurrency, passes=2)
    if "long" in args.parts:
        ttfts = [run_benchmark(llm_engine, args.long_len, 1, 1, args.seed, limits).ttft_s.p50
                 for _ in range(args.ttft_repeats)]
        record({"system": "kiln", "what": "ttft", "input_len": args.long_len, "ttft_s": ttfts,
                "median_s": statistics.median(ttfts)})
        for concurrency in args.long_concurrency:
            measure(args.input_len, args.long_len, concurrency, passes=1)
            measure(args.long_len, args.output_len, concurrency, passes=1)
    if "load" in args.parts:
        del llm_engine  # its KV cache goes before the loaded engine's weights come
        _release_memory()
        record(save_and_load(engine))


def save_and_load(engine) -> dict:
    """Times of ``engine.save``, ``kiln.load`` and the runtime's start on the loaded engine."""
    with tempfile.TemporaryDirectory(prefix="kiln-engine-") as directory:
        start = time.perf_counter()
        engine.save(directory)
        saved = time.perf_counter()
        loaded = kiln.load(directory)
        loaded_at = time.perf_counter()
        LLMEngine(loaded, RuntimeConfig(num_blocks=16))
        ready = time.perf_counter()
    return {"system": "kiln", "what": "load", "save_seconds": saved - start, "load_seconds": loaded_at - saved,
            "start_seconds": ready - loaded_at}


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the JSON file of results (rewritten per record)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--model", default=None, help="a checkpoint directory (default: the 8B shape, random)")
    parser.add_argument("--target", default="cuda",
                        help="kiln's target: cuda (this GPU), h100 or h200 (cpu runs everything on the CPU)")
    parser.add_argument("--dtype", default="bfloat16", help="the checkpoint's dtype for kiln and transformers")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--long-len", type=int, default=2048)
    parser.add_argument("--long-concurrency", type=int, nargs="+", default=[1])
    parser.add_argument("--ttft-repeats", type=int, default=3)
    parser.add_argument("--transformers-concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--static-concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


class ResultsFile:
    """A run's records: each printed as it comes, and the file at ``path`` rewritten with
    all of them (under the device, torch's version and the command) after each, so a run
    cut short keeps what it measured."""

    def __init__(self, path: Path, device: str):
        self.path = path
        self.results: list[dict] = []
        self.header = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                       "torch": torch.__version__, "command": sys.argv}

    def __call__(self, entry: dict) -> None:
        self.results.append(entry)
        print(json.dumps(entry), flush=True)
        self.path.write_text(json.dumps({**self.header, "results": self.results}, indent=2))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = "cpu" if args.target == "cpu" else "cuda"
    record = ResultsFile(args.out, device)
    limits = hardware_limits(device)
    record({"system": "hardware", **asdict(limits)})
    _release_memory()
    model = checkpoint_model(args.model, args.dtype, device) if args.model else llama_8b(device)
    record({"system": "model", "name": args.model or "llama-3.1-8b shape (random bf16)",
            "parameters": sum(p.numel() for p in model.parameters())})
    if {"kiln", "long", "load"} & set(args.parts):
        bench_kiln(args.model or model, args, limits, record)
        _release_memory()  # the engine's weights and KV cache go before the peers run
    vocabulary, rng = transformers_vocabulary(model, args.model), random.Random(args.seed)
    if "transformers" in args.parts:
        bench_transformers(model, args.input_len, args.output_len, args.transformers_concurrency, False,
                           vocabulary, rng, record)
    if "static" in args.parts:
        bench_transformers(model, args.input_len, args.output_len, args.static_concurrency, True, vocabulary, rng,
                           record)


if __name__ == "__main__":
    main()
