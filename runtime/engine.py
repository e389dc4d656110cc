"""Compiled artifacts: ``Engine`` for causal LMs (the paged step graph, its generated
executor, weights, tokenizer) and ``CompiledModule`` for plain modules."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..backends import kernels_for
from ..ir import Graph, for_rank, interpret, sym
from ..passes.profiles import ProfilePlan
from ..version import __version__
from .batch import SequenceStep, step_inputs
from .engine_files import EngineLoadError, read_engine, read_manifest, write_engine
from .executor import Step, generate_executor, load_executor
from .pipeline_files import pipeline_files

_MAX_SEQ_LEN = sym("max_seq_len")  # the linear cache layout's block size


class CompiledModule:
    """A compiled ``nn.Module``: call it with the module's tensor inputs."""

    def __init__(self, graph: Graph, unflatten: Any):
        self.graph = graph
        self._unflatten = unflatten
        self._constants: dict[str, torch.Tensor] | None = None

    def export_onnx(self, path: str | os.PathLike) -> None:
        """Write the module's graph as an ONNX model (see ``kiln.backends.onnx``)."""
        from ..backends.onnx import export_onnx

        export_onnx(self.graph, path)

    def __call__(self, *inputs: torch.Tensor) -> Any:
        if self._constants is None:
            self._constants = {name: v.tensor() for name, v in self.graph.constants.items()}
        with torch.no_grad():
            return self._unflatten(interpret(self.graph, inputs, constants=self._constants))


@dataclass(frozen=True)
class EngineInfo:
    """What an engine was built for."""

    architecture: str
    target: str
    backend: str
    dtype: torch.dtype
    max_batch_size: int
    max_seq_len: int
    max_num_tokens: int
    profiles: ProfilePlan  # chosen for the limits and the expected workload at build time
    stop_token_ids: tuple[int, ...] = ()
    quantization: Mapping[str, Any] | None = None  # QuantConfig.to_dict(): scheme and options
    kv_cache_dtype: str = "auto"
    tp: int = 1
    pp: int = 1
    tuned_on: str | None = None  # the GPU whose kernel configurations the engine holds (None: defaults)
    workspace_bytes: Mapping[str, int] = field(default_factory=dict)  # activation memory per profile

    def manifest_fields(self) -> dict[str, Any]:
        """The engine's description as its manifest stores it (JSON values)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**fields, "dtype": str(self.dtype).removeprefix("torch."), "profiles": asdict(self.profiles),
                "stop_token_ids": list(self.stop_token_ids), "workspace_bytes": dict(self.workspace_bytes)}

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> EngineInfo:
        """The description that ``manifest_fields`` wrote."""
        fields = {f.name: manifest[f.name] for f in dataclasses.fields(cls)}
        return cls(**{**fields, "dtype": getattr(torch, manifest["dtype"]),
                      "profiles": ProfilePlan.from_dict(manifest["profiles"]),
                      "stop_token_ids": tuple(manifest["stop_token_ids"])})


CACHE_PREFIXES = ("k_cache_", "v_cache_", "latent_cache_")  # the step graph's cache inputs: <prefix><layer>


@dataclass(frozen=True)
class CacheSpec:
    """The KV caches the step graph takes: one (key, value) pair per layer, or one cache of
    latents per multi-head latent attention layer (heads 1, width rank + rope)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]  # (kv_heads, head_dim) per cache input
    dtype: torch.dtype
    linear: bool  # one block of max_seq_len per sequence (the tensorrt pipeline's layout)

    def bytes_per_token(self) -> int:
        """Bytes of cache one token takes, over all layers."""
        return sum(h * d for h, d in self.shapes) * torch.empty((), dtype=self.dtype).element_size()

    def allocate(self, num_blocks: int, block_size: int, device: torch.device | str) -> dict[str, torch.Tensor]:
        """Zeroed caches of ``num_blocks`` blocks of ``block_size`` tokens."""
        return {name: torch.zeros((num_blocks, block_size, h, d), dtype=self.dtype, device=device)
                for name, (h, d) in zip(self.names, self.shapes)}


@dataclass
class Engine:
    """A compiled causal LM: the step graph over a paged KV cache, the executor generated
    from it, the weights (materialized on first use per device), the tokenizer and config."""

    graph: Graph
    tokenizer: Any
    config: Any
    info: EngineInfo
    executor_source: str = ""
    kernel_configs: dict[str, dict] = field(default_factory=dict)  # op -> tuned launch parameters
    loaded_rank: int | None = None  # loaded from a directory with one tensor-parallel rank's weights (or none: pp > 1)
    directory: str | None = None  # the directory it was loaded from
    artifacts: dict[str, bytes] = field(default_factory=dict, repr=False)  # backend files (TensorRT plans)
    artifact_info: dict[str, Any] = field(default_factory=dict)  # what the manifest says of them
    _weights: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    _steps: dict[str, Step] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.executor_source:
            self.executor_source = generate_executor(self.graph, self.info.backend, __version__)
        caches = [v for v in self.graph.inputs if v.name.startswith(CACHE_PREFIXES)]
        if not caches:
            raise ValueError(f"graph @{self.graph.name} is not a paged step graph: it takes no KV caches")
        self.cache_spec = CacheSpec(tuple(v.name for v in caches), tuple((v.shape[2], v.shape[3]) for v in caches),
                                    caches[0].dtype.torch_dtype, caches[0].shape[1] == _MAX_SEQ_LEN)

    def weights(self, device: torch.device | str = "cpu", rank: int | None = None) -> dict[str, torch.Tensor]:
        """Every constant the executor reads, on ``device`` (materialized once per device):
        this engine's own, or tensor-parallel rank ``rank``'s shards of them."""
        key = str(torch.device(device)) + ("" if rank is None else f"/rank{rank}")
        if key not in self._weights:
            self._weights[key] = {name: t.to(device) for name, t in self._constants(rank).items()}
        return self._weights[key]

    def _constants(self, rank: int | None) -> dict[str, torch.Tensor]:
        if rank is not None and self.loaded_rank is not None:
            raise ValueError(f"this engine was loaded for tensor-parallel rank {self.loaded_rank} and holds only "
                             "that rank's weights")
        return {name: v.tensor() if rank is None else for_rank(v.data, rank).materialize()
                for name, v in self.graph.constants.items() if v.uses or v in self.graph.outputs}

    def step_function(self, device: torch.device | str = "cpu") -> Step:
        """The executor bound to this engine's weights and the backend's kernels on
        ``device`` (the reference kernels on the CPU, whatever the backend)."""
        key = str(torch.device(device))
        if key not in self._steps:
            kernels = kernels_for(self.info.backend, self.info.target, self.info.tuned_on, device,
                                  self.kernel_configs)
            self._steps[key] = load_executor(self.executor_source, "executor.py", self.weights(device), kernels)
        return self._steps[key]

    def logits(self, ids: torch.Tensor, block_size: int = 16) -> torch.Tensor:
        """Logits [batch, seq, vocab] of every position of each row of ``ids``, each row
        prefilled as one sequence of one step, over a scratch cache."""
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"token ids must be [batch, seq] with seq >= 1, got shape {tuple(ids.shape)}")
        batch, seq = ids.shape
        if batch > self.info.max_batch_size or seq > self.info.max_seq_len:
            raise ValueError(f"input of {batch} sequences of {seq} tokens exceeds the engine's limits "
                             f"({self.info.max_batch_size} sequences of {self.info.max_seq_len} tokens)")
        block_size = self.info.max_seq_len if self.cache_spec.linear else block_size
        per_seq = -(-seq // block_size)
        steps = [SequenceStep(row.tolist(), 0, list(range(i * per_seq, (i + 1) * per_seq))) for i, row in
                 enumerate(ids)]
        inputs = step_inputs(steps, block_size, all_logits=True)
        caches = self.cache_spec.allocate(batch * per_seq, block_size, "cpu")
        with torch.no_grad():
            logits = self.step_function("cpu")(**inputs, **caches)[0]
        return logits.view(batch, seq, -1)

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of ``prompt`` (a string, or token ids already)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: pass token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary of {vocab}")
        return ids

    @property
    def vocab_size(self) -> int:
        """Columns of the logits."""
        return int(self.graph.outputs[0].shape[-1])

    def export_onnx(self, path: str | os.PathLike) -> None:
        """Write the step graph as an ONNX model: the step's inputs and the KV caches in,
        ``logits`` and the updated caches (``<cache>_out``) out (see ``kiln.backends.onnx``)."""
        from ..backends.onnx import export_onnx

        export_onnx(self.graph, path, ["logits", *(f"{name}_out" for name in self.cache_spec.names)])

    def save(self, path: str | os.PathLike) -> None:
        """Write the engine directory (see ``kiln.runtime.engine_files``)."""
        texts: dict[str, str] = {}
        if self.info.pp > 1:  # one graph, executor and weights file per stage (and rank)
            texts, ranks = pipeline_files(self.graph, self.info.pp, self.info.tp, self.info.backend, __version__)
        elif self.info.tp > 1:
            ranks = [self._constants(rank) for rank in range(self.info.tp)]
        else:
            ranks = [self.weights("cpu")]
        write_engine(path, self.graph, self.executor_source, ranks, self.config, self.tokenizer,
                     {**self.info.manifest_fields(), "kernel_configs": self.kernel_configs,
                      "artifact_info": self.artifact_info}, self.artifacts, texts)


def load_engine(path: str | os.PathLike, target: str | None = None, rank: int = 0) -> Engine:
    """Load the engine in directory ``path`` (no pass runs), with tensor-parallel rank
    ``rank``'s weights; refuse one built for another ``target`` (when given), by another
    kiln version, with a changed file, or for another GPU."""
    manifest = read_manifest(path)
    try:
        info, kernel_configs = EngineInfo.from_manifest(manifest), dict(manifest["kernel_configs"])
        artifact_info = dict(manifest.get("artifact_info", {}))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise EngineLoadError(f"the manifest of engine {path} does not describe an engine: "
                              f"{type(exc).__name__}: {exc}") from None
    directory = read_engine(path, target, rank)
    return Engine(directory.graph, directory.tokenizer, directory.config, info, directory.executor_source,
                  kernel_configs, loaded_rank=rank if info.tp * info.pp > 1 else None, directory=str(path),
                  artifacts=directory.artifacts, artifact_info=artifact_info)
