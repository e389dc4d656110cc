"""``kiln.compile``: the one entry point from a model to something that runs;
``kiln.load`` for engines saved with ``engine.save``; and ``kiln.LLM``, which takes a
checkpoint directory too."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .backends import check_backend_support
from .frontends.huggingface import ImportedLM, import_model, load_checkpoint
from .frontends.modules import import_module
from .ir import Graph, dtypes, verify
from .passes import (EngineLimits, QuantConfig, Workload, check_dispatch, pipeline_manager, run_pipeline,
                     select_profiles, split_pipeline)
from .passes.workspace import plan_workspace
from .runtime import CompiledModule, Engine, EngineInfo, RuntimeConfig, load_engine
from .runtime import LLM as EngineLLM
from .runtime.engine import CACHE_PREFIXES
from .runtime.engine_files import MANIFEST

# target -> (pipeline, backend)
TARGETS = {"cpu": ("reference", "reference"), "cuda": ("cuda", "cuda"), "h100": ("cuda", "cuda"),
           "h200": ("cuda", "cuda"), "tensorrt": ("tensorrt", "tensorrt")}


def compile(model: str | os.PathLike | nn.Module, *, target: str = "cpu", dtype: str | torch.dtype | None = None,
            quantization: str | QuantConfig | None = None, kv_cache_dtype: str = "auto", tp: int = 1, pp: int = 1,
            max_batch_size: int = 256, max_seq_len: int = 8192, max_num_tokens: int | None = None,
            workload: Workload | None = None, example_inputs: Sequence[torch.Tensor] | None = None,
            dynamic_shapes: Any = None, tokenizer: Any = None, progress: bool = False,
            calibration: Sequence[str] | None = None, ep: int = 1,
            expert_dispatch: str = "all_reduce") -> Engine | CompiledModule:
    """Compile a model for ``target``.

    ``model`` is a Hugging Face checkpoint directory (pre-quantized GPTQ, AWQ and FP8 ones
    are detected), a llama.cpp ``.gguf`` file or an in-memory ``transformers`` causal LM
    (giving an ``Engine``), or any ``nn.Module`` with ``example_inputs`` (and
    optionally torch.export ``dynamic_shapes``) or an ``.onnx`` file, giving a
    ``CompiledModule`` with the module's outputs. ``max_num_tokens`` (tokens per step, default ``max(max_seq_len,
    max_batch_size)``) and ``workload`` (expected decode batch sizes and prompt lengths)
    choose the engine's dynamic-shape profiles and CUDA-graph batch sizes. ``progress``
    shows a progress bar over the build's stages. ``quantization`` is a scheme name
    (``int8``, ``int4``, ``fp8``, ``int4_gptq``, ``int4_awq``, ``w8a8_sq``) or a
    ``QuantConfig`` (skip list, LM head, INT4 groups, the schemes' options);
    ``kv_cache_dtype="fp8"`` stores the KV cache in E4M3. ``calibration`` is the text that
    the calibrated schemes and static activation scales calibrate on (default: Python's
    documentation). ``ep=tp`` splits the experts of mixture-of-experts layers across the
    ``tp`` ranks (expert parallelism) instead of holding every expert on every rank;
    ``expert_dispatch`` says how tokens meet them: ``"all_reduce"`` (every rank runs its
    experts on all the tokens routed to them, then one all-reduce) or ``"all_to_all"``
    (each rank routes its share of the tokens and sends them to the experts' ranks).
    """
    _check_options(target, kv_cache_dtype, tp, pp, max_batch_size, max_seq_len)
    if ep not in (1, tp):
        raise ValueError(f"ep must be 1 or equal to tp ({tp}): expert parallelism splits the experts across the "
                         f"tensor-parallel ranks, got ep={ep}")
    check_dispatch(expert_dispatch, ep)
    quant = QuantConfig.of(quantization) if quantization is not None else None
    if calibration is not None and (quant is None or not quant.calibrated):
        raise ValueError("calibration text is used by int4_gptq, int4_awq, w8a8_sq and static activation scales only "
                         "(QuantConfig('fp8', activations='static'))")
    limits = EngineLimits(max_batch_size, max_seq_len, max_num_tokens or max(max_seq_len, max_batch_size))
    if isinstance(model, (str, os.PathLike)) and os.fspath(model).endswith(".onnx"):
        from .frontends.onnx import import_onnx, unflatten_outputs

        return CompiledModule(_optimize(import_onnx(model)), unflatten_outputs)
    if isinstance(model, (str, os.PathLike)):
        with _stages(progress) as stage:
            stage("importing")
            imported = _load_path(model, dtype, max_batch_size, max_seq_len)
            return _engine(imported, target, limits, workload, _stop_tokens_of_dir(model), stage, tp, quant,
                           kv_cache_dtype, calibration, pp, ep, expert_dispatch)
    if not isinstance(model, nn.Module):
        raise TypeError(f"kiln.compile takes a checkpoint directory or an nn.Module, got {type(model).__name__}")
    if example_inputs is None and _is_causal_lm(model):
        with _stages(progress) as stage:
            stage("importing")
            imported = import_model(model, tokenizer, max_batch_size, max_seq_len)
            return _engine(imported, target, limits, workload,
                           _ids(getattr(model.generation_config, "eos_token_id", None)), stage, tp, quant,
                           kv_cache_dtype, calibration, pp, ep, expert_dispatch)
    if example_inputs is None:
        raise TypeError(f"compiling a {type(model).__name__} needs example_inputs")
    if quant is not None or kv_cache_dtype != "auto":
        raise ValueError("quantization and kv_cache_dtype apply to causal LMs (a checkpoint or a transformers "
                         f"model), not to a plain {type(model).__name__}")
    imported = import_module(model, example_inputs, dynamic_shapes)
    return CompiledModule(_optimize(imported.graph), imported.unflatten)


def _load_path(path: str | os.PathLike, dtype: str | torch.dtype | None, max_batch_size: int,
               max_seq_len: int) -> ImportedLM:
    """A checkpoint directory, or a llama.cpp ``.gguf`` file."""
    if os.fspath(path).endswith(".gguf"):
        from .frontends.gguf import load_gguf

        return load_gguf(path, dtype, max_batch_size, max_seq_len)
    return load_checkpoint(path, dtype, max_batch_size, max_seq_len)


def _is_causal_lm(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel) and model.can_generate()


def _optimize(graph: Graph) -> Graph:
    pipeline_manager("cleanup").run(graph)
    verify(graph)
    return graph


@contextlib.contextmanager
def _stages(show: bool):
    """A progress bar over the build's stages; yields a function that starts the next one."""
    bar = tqdm(total=len(BUILD_STAGES), desc="building", unit="stage", disable=not show, leave=False)

    def stage(name: str) -> None:
        if bar.n or name != BUILD_STAGES[0]:
            bar.update(1)
        bar.set_description(name)

    stage.show = show

    try:
        yield stage
        bar.update(bar.total - bar.n)
    finally:
        bar.close()


BUILD_STAGES = ("importing", "optimizing", "generating the executor", "tuning kernels")


def _engine(imported: ImportedLM, target: str, limits: EngineLimits, workload: Workload | None,
            stop_token_ids: tuple[int, ...], stage, tp: int = 1, quantization: QuantConfig | None = None,
            kv_cache_dtype: str = "auto", calibration: Sequence[str] | None = None, pp: int = 1,
            ep: int = 1, expert_dispatch: str = "all_reduce") -> Engine:
    architecture = (getattr(imported.config, "architectures", None) or [imported.config.model_type])[0]
    pipeline, backend = TARGETS[target]
    eos = getattr(imported.tokenizer, "eos_token_id", None)
    stops = stop_token_ids or _ids(getattr(imported.config, "eos_token_id", None)) or _ids(eos)
    info = EngineInfo(architecture, target, backend, imported.dtype, limits.max_batch_size, limits.max_seq_len,
                      limits.max_num_tokens, select_profiles(limits, workload), stops, tp=tp, pp=pp,
                      quantization=_quantization_record(quantization, imported.quantization),
                      kv_cache_dtype=kv_cache_dtype)
    graph = imported.graph
    stage("optimizing")
    batches = calibration_batches(imported.tokenizer, calibration, limits.max_seq_len) \
        if quantization and quantization.calibrated else ()
    run_pipeline(pipeline, graph, tp, quantization, kv_cache_dtype, batches, ep=ep, expert_dispatch=expert_dispatch)
    verify(graph)
    check_backend_support(graph, backend, target)
    _check_cache_dtype(graph, kv_cache_dtype)
    if pp > 1:
        split_pipeline(graph, pp)  # refused here, with the reason, if the graph has too few places to cut
    info = dataclasses.replace(info, workspace_bytes=plan_workspace(graph, info.profiles))
    stage("generating the executor")
    engine = Engine(graph, imported.tokenizer, imported.config, info)
    if backend == "tensorrt":
        from .backends.tensorrt import build_engine_plan

        stage("building the TensorRT plan")
        engine.artifact_info, engine.artifacts = build_engine_plan(
            graph, info.profiles, limits.max_batch_size, limits.max_seq_len, progress=stage.show)
        return engine
    stage("tuning kernels")
    if backend == "cuda":
        from .backends.cuda.tuning import tune_engine_kernels

        tuned_on, configs = tune_engine_kernels(graph, target, limits)
        engine.info = dataclasses.replace(info, tuned_on=tuned_on)
        engine.kernel_configs = configs
    return engine


def _quantization_record(config: QuantConfig | None, checkpoint: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the manifest records: the scheme the build applied and the one the checkpoint came in."""
    record = config.to_dict() if config else None
    return {**(record or {}), "checkpoint": checkpoint} if checkpoint else record


def _check_cache_dtype(graph: Graph, kv_cache_dtype: str) -> None:
    """Refuse an E4M3 KV cache that the pipeline could not give every cache (a latent cache)."""
    if kv_cache_dtype != "fp8":
        return
    wide = [v.name for v in graph.inputs if v.name.startswith(CACHE_PREFIXES) and v.dtype != dtypes.float8_e4m3fn]
    if wide:
        raise ValueError(f"kv_cache_dtype='fp8' does not apply to caches {', '.join(wide)} yet (an E4M3 cache of "
                         "multi-head latent attention is not done): use kv_cache_dtype='auto'")


def calibration_batches(tokenizer: Any, texts: Sequence[str] | None, max_seq_len: int,
                         max_tokens: int = 512) -> list[torch.Tensor]:
    """Token ids ``[1, n]`` of each calibration text (Python's documentation by default),
    cut to ``max_tokens`` and the engine's length."""
    from .passes.quantization import default_corpus

    if tokenizer is None:
        raise ValueError("calibration needs the model's tokenizer: pass tokenizer= with an in-memory model")
    texts = default_corpus() if texts is None else texts
    batches = [torch.tensor([tokenizer(t)["input_ids"][:min(max_tokens, max_seq_len)]]) for t in texts]
    batches = [b for b in batches if b.shape[1] >= 2]
    if not batches:
        raise ValueError("the calibration texts hold no sample of two tokens or more")
    return batches


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


def _stop_tokens_of_dir(path: str | os.PathLike) -> tuple[int, ...]:
    """The end-of-sequence ids of the checkpoint's generation_config.json, if it has one."""
    file = os.path.join(path, "generation_config.json")
    if not os.path.isfile(file):
        return ()
    with open(file) as f:
        return _ids(json.load(f).get("eos_token_id"))


def _check_options(target: str, kv_cache_dtype: str, tp: int, pp: int, max_batch_size: int,
                   max_seq_len: int) -> None:
    if target not in TARGETS:
        raise ValueError(f"target {target!r} is not available yet: kiln builds for {', '.join(TARGETS)}")
    if kv_cache_dtype not in ("auto", "fp8"):
        raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} is not one of 'auto' (the model's dtype) and 'fp8'")
    if tp < 1 or pp < 1:
        raise ValueError(f"tp and pp must be at least 1, got tp={tp}, pp={pp}")
    if pp > 1 and TARGETS[target][1] == "tensorrt":
        raise ValueError("pipeline parallelism (pp > 1) is not available for target 'tensorrt': its plan holds the "
                         "whole model")
    if max_batch_size < 1 or max_seq_len < 2:
        raise ValueError(f"max_batch_size must be >= 1 and max_seq_len >= 2, got {max_batch_size}, {max_seq_len}")


def load(path: str | os.PathLike, target: str | None = None, rank: int = 0) -> Engine:
    """Load the engine saved in directory ``path`` (no passes run), with tensor-parallel
    rank ``rank``'s weights; refuse one built for another ``target`` (when given), by
    another kiln version, or with a changed file."""
    return load_engine(path, target, rank=rank)


def as_engine(model: Engine | str | os.PathLike, **compile_options: Any) -> Engine:
    """An engine from an ``Engine``, an engine directory (loaded) or a checkpoint
    directory (compiled with ``compile_options``)."""
    if isinstance(model, Engine):
        return model
    if os.path.isfile(os.path.join(model, MANIFEST)):
        return load_engine(model)
    return compile(model, **compile_options)


class LLM(EngineLLM):
    """``kiln.runtime.LLM`` over an ``Engine``, an engine directory or a checkpoint
    directory (compiled first, with ``compile_options``: see ``kiln.compile``)."""

    def __init__(self, model: Engine | str | os.PathLike, runtime: RuntimeConfig | None = None,
                 **compile_options: Any):
        super().__init__(as_engine(model, **compile_options), runtime)
