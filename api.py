"""``kiln.compile``: the one entry point from a model to something that runs; and
``kiln.load`` for engines saved with ``engine.save``."""

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

from .frontends.huggingface import ImportedLM, import_model, load_checkpoint
from .frontends.modules import import_module
from .ir import Graph, verify
from .passes import EngineLimits, Workload, pipeline_manager, select_profiles
from .passes.workspace import plan_workspace
from .runtime import CompiledModule, Engine, EngineInfo, load_engine

# target -> (pipeline, backend)
TARGETS = {"cpu": ("reference", "reference"), "cuda": ("cuda", "cuda"), "h100": ("cuda", "cuda"),
           "h200": ("cuda", "cuda"), "tensorrt": ("tensorrt", "tensorrt")}


def compile(model: str | os.PathLike | nn.Module, *, target: str = "cpu", dtype: str | torch.dtype | None = None,
            quantization: str | None = None, kv_cache_dtype: str = "auto", tp: int = 1, pp: int = 1,
            max_batch_size: int = 256, max_seq_len: int = 8192, max_num_tokens: int | None = None,
            workload: Workload | None = None, example_inputs: Sequence[torch.Tensor] | None = None,
            dynamic_shapes: Any = None, tokenizer: Any = None, progress: bool = False) -> Engine | CompiledModule:
    """Compile a model for ``target``.

    ``model`` is a Hugging Face checkpoint directory or an in-memory ``transformers``
    causal LM (giving an ``Engine``), or any ``nn.Module`` with ``example_inputs`` (and
    optionally torch.export ``dynamic_shapes``) or an ``.onnx`` file, giving a
    ``CompiledModule`` with the module's outputs. ``max_num_tokens`` (tokens per step, default ``max(max_seq_len,
    max_batch_size)``) and ``workload`` (expected decode batch sizes and prompt lengths)
    choose the engine's dynamic-shape profiles and CUDA-graph batch sizes. ``progress``
    shows a progress bar over the build's stages.
    """
    _check_options(target, quantization, kv_cache_dtype, tp, pp, max_batch_size, max_seq_len)
    limits = EngineLimits(max_batch_size, max_seq_len, max_num_tokens or max(max_seq_len, max_batch_size))
    if isinstance(model, (str, os.PathLike)) and os.fspath(model).endswith(".onnx"):
        from .frontends.onnx import import_onnx, unflatten_outputs

        return CompiledModule(_optimize(import_onnx(model)), unflatten_outputs)
    if isinstance(model, (str, os.PathLike)):
        with _stages(progress) as stage:
            stage("importing")
            imported = load_checkpoint(model, dtype, max_batch_size, max_seq_len)
            return _engine(imported, target, limits, workload, _stop_tokens_of_dir(model), stage)
    if not isinstance(model, nn.Module):
        raise TypeError(f"kiln.compile takes a checkpoint directory or an nn.Module, got {type(model).__name__}")
    if example_inputs is None and _is_causal_lm(model):
        with _stages(progress) as stage:
            stage("importing")
            imported = import_model(model, tokenizer, max_batch_size, max_seq_len)
            return _engine(imported, target, limits, workload,
                           _ids(getattr(model.generation_config, "eos_token_id", None)), stage)
    if example_inputs is None:
        raise TypeError(f"compiling a {type(model).__name__} needs example_inputs")
    imported = import_module(model, example_inputs, dynamic_shapes)
    return CompiledModule(_optimize(imported.graph), imported.unflatten)


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
            stop_token_ids: tuple[int, ...], stage) -> Engine:
    architecture = (getattr(imported.config, "architectures", None) or [imported.config.model_type])[0]
    pipeline, backend = TARGETS[target]
    eos = getattr(imported.tokenizer, "eos_token_id", None)
    stops = stop_token_ids or _ids(getattr(imported.config, "eos_token_id", None)) or _ids(eos)
    info = EngineInfo(architecture, target, backend, imported.dtype, limits.max_batch_size, limits.max_seq_len,
                      limits.max_num_tokens, select_profiles(limits, workload), stops)
    graph = imported.graph
    stage("optimizing")
    pipeline_manager(pipeline).run(graph)
    verify(graph)
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


def _check_options(target: str, quantization: str | None, kv_cache_dtype: str, tp: int, pp: int,
                   max_batch_size: int, max_seq_len: int) -> None:
    if target not in TARGETS:
        raise ValueError(f"target {target!r} is not available yet: kiln builds for {', '.join(TARGETS)}")
    if quantization is not None:
        raise ValueError(f"quantization {quantization!r} is not available yet")
    if kv_cache_dtype != "auto":
        raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} is not available yet")
    if tp != 1 or pp != 1:
        raise ValueError("tensor and pipeline parallelism are not available yet (tp=1, pp=1)")
    if max_batch_size < 1 or max_seq_len < 2:
        raise ValueError(f"max_batch_size must be >= 1 and max_seq_len >= 2, got {max_batch_size}, {max_seq_len}")


def load(path: str | os.PathLike, target: str | None = None) -> Engine:
    """Load the engine saved in directory ``path`` (no passes run); refuse one built for
    another ``target`` (when given), by another kiln version, or with a changed file."""
    return load_engine(path, target)
