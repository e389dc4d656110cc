"""The CUDA target serving a tiny random transformers model step by step, with its Triton
kernels (Triton's interpreter on a CPU, the GPU where there is one), against transformers'
logits and greedy tokens over the whole sequence so far."""

import contextlib
from pathlib import Path

import pytest
import torch
from hf_models import write_checkpoint

import kiln
from kiln.runtime.batch import SequenceStep, step_inputs
from kiln.runtime.executor import load_executor

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = 1e-5 if DEVICE == "cpu" else 1e-2  # a GPU's float32 tl.dot rounds its operands to TF32


def compile_for_cuda(model: torch.nn.Module, directory: Path) -> kiln.Engine:
    """``model`` written as a checkpoint in ``directory`` and compiled for target "cuda" in
    float32 (for at most 4 sequences of 64 tokens); untuned, with a warning, on a CPU."""
    pytest.importorskip("kiln.backends.cuda.kernels")
    checkpoint = write_checkpoint(model, directory)
    untuned = pytest.warns(UserWarning, match="not tuned") if DEVICE == "cpu" else contextlib.nullcontext()
    with untuned:
        return kiln.compile(checkpoint, target="cuda", dtype="float32", max_batch_size=4, max_seq_len=64,
                            max_num_tokens=64)


def assert_serves_transformers_greedy(engine: kiln.Engine, model: torch.nn.Module, sequences: list[list[int]],
                                      blocks: list[list[int]], steps: int = 5) -> None:
    """Run ``engine``'s step graph with the CUDA kernels: first the prompts ``sequences`` (in
    the cache blocks ``blocks``, 12 blocks of 4 slots), then ``steps - 1`` greedy decodes. Each
    step's logits are within ``TOLERANCE`` of transformers' over the whole sequence so far, and
    its greedy tokens equal transformers' wherever the best two logits are not within twice that."""
    cuda_kernels = pytest.importorskip("kiln.backends.cuda.kernels").cuda_kernels
    step = load_executor(engine.executor_source, "executor.py", engine.weights(DEVICE), cuda_kernels(DEVICE))
    caches = engine.cache_spec.allocate(12, 4, DEVICE)
    model = model.to(DEVICE)
    state = [SequenceStep(ids, 0, table) for ids, table in zip(sequences, blocks)]
    for _ in range(steps):
        with torch.no_grad():
            got = step(**{k: v.to(DEVICE) for k, v in step_inputs(state, 4).items()}, **caches)[0]
            want = torch.cat([model(torch.tensor([ids], device=DEVICE)).logits[:, -1] for ids in sequences])
        assert (got - want).abs().max() < TOLERANCE
        best, second = want.topk(2).values.unbind(-1)
        chosen = want.argmax(-1)
        assert (got.argmax(-1) == chosen)[best - second > 2 * TOLERANCE].all()
        tokens = chosen.tolist()
        state = [SequenceStep([t], len(ids), s.blocks) for s, t, ids in zip(state, tokens, sequences)]
        sequences = [ids + [t] for ids, t in zip(sequences, tokens)]
