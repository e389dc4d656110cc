"""Compiled artifacts of the CPU target: ``CompiledModule`` for plain modules and
``Engine`` for causal language models. Both run their optimized graph with the
reference implementations; weights are materialized once, on first use."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..ir import Graph, interpret
from ..passes.profiles import ProfilePlan


class _Runner:
    """Runs a graph with its constants materialized once."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self._constants: dict[str, torch.Tensor] | None = None

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if self._constants is None:
            self._constants = {name: v.tensor() for name, v in self.graph.constants.items()}
        with torch.no_grad():
            return interpret(self.graph, inputs, constants=self._constants)


class CompiledModule:
    """A compiled ``nn.Module``: call it with the module's tensor inputs."""

    def __init__(self, graph: Graph, unflatten: Any):
        self.graph = graph
        self._runner = _Runner(graph)
        self._unflatten = unflatten

    def __call__(self, *inputs: torch.Tensor) -> Any:
        return self._unflatten(self._runner.run(inputs))


@dataclass(frozen=True)
class EngineInfo:
    """What an engine was built for."""

    architecture: str
    target: str
    dtype: torch.dtype
    max_batch_size: int
    max_seq_len: int
    profiles: ProfilePlan  # chosen for the limits and the expected workload at build time


@dataclass(frozen=True)
class Generation:
    """The result of ``Engine.generate``."""

    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds else 0.0


class Engine:
    """A compiled causal LM: token ids [batch, seq] to logits [batch, seq, vocab]."""

    def __init__(self, graph: Graph, tokenizer: Any, config: Any, info: EngineInfo):
        self.graph = graph
        self.tokenizer = tokenizer
        self.config = config
        self.info = info
        self._runner = _Runner(graph)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits for every position of each sequence of ``ids``."""
        if ids.dim() != 2:
            raise ValueError(f"token ids must be [batch, seq], got shape {tuple(ids.shape)}")
        batch, seq = ids.shape
        if batch > self.info.max_batch_size or seq > self.info.max_seq_len:
            raise ValueError(f"input of {batch} sequences of {seq} tokens exceeds the engine's limits "
                             f"({self.info.max_batch_size} sequences of {self.info.max_seq_len} tokens)")
        return self._runner.run([ids.to(torch.int64)])[0]

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 32) -> Generation:
        """Greedy decoding of one prompt, recomputing the whole sequence at each step
        (the KV cache and the batched runtime come with the paged-attention pipeline)."""
        ids = self._encode(prompt)
        if len(ids) + max_new_tokens > self.info.max_seq_len:
            raise ValueError(f"prompt of {len(ids)} tokens plus {max_new_tokens} new tokens exceeds "
                             f"max_seq_len {self.info.max_seq_len}")
        eos = getattr(self.tokenizer, "eos_token_id", None)
        tokens = list(ids)
        start = time.perf_counter()
        for _ in range(max_new_tokens):
            next_id = int(self.logits(torch.tensor([tokens]))[0, -1].argmax())
            tokens.append(next_id)
            if next_id == eos:
                break
        seconds = time.perf_counter() - start
        new = tokens[len(ids):]
        text = self.tokenizer.decode(new, skip_special_tokens=True) if self.tokenizer else ""
        return Generation(text, new, list(ids), seconds)

    def _encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: pass token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty")
        return ids
