"""``LLM``: offline batched generation over an engine, with vLLM's names.

    llm = LLM("engine-dir")               # or an Engine (``kiln.LLM`` also compiles checkpoints)
    outputs = llm.generate(["Hello", [1, 2, 3]], kiln.SamplingParams(max_tokens=32))
    outputs[0].text, outputs[0].token_ids
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from .engine import Engine, load_engine
from .llm_engine import LLMEngine, RuntimeConfig
from .outputs import RequestOutput
from .sampling_params import SamplingParams

if TYPE_CHECKING:
    from .disaggregated import PrefillStats
    from .pipeline import PipelineStats

Prompt = str | Sequence[int]


class LLM:
    """Generates text for batches of prompts over one engine (or an engine directory,
    loaded), with in-flight batching. ``kiln.LLM`` also takes a checkpoint directory."""

    def __init__(self, engine: Engine | str | os.PathLike, runtime: RuntimeConfig | None = None):
        self.engine = engine if isinstance(engine, Engine) else load_engine(engine)
        self.llm_engine = LLMEngine(self.engine, runtime)

    def close(self) -> None:
        """Stop the engine's parallel workers, if it has any."""
        self.llm_engine.close()

    def pipeline_stats(self) -> PipelineStats:
        """The steps' wall time and each pipeline stage's busy time so far, with the bubble
        measured and predicted (``kiln.runtime.pipeline.PipelineStats``), for an engine
        served by workers (tp or pp > 1)."""
        if self.llm_engine.workers is None:
            raise ValueError("this engine runs in one process (tp = pp = 1): it has no stages to report on")
        return self.llm_engine.workers.stats()

    def prefill_stats(self) -> PrefillStats:
        """The prefills of disaggregated serving so far: the workers' compute time and how
        much of the KV transfer hid behind it (``kiln.runtime.disaggregated.PrefillStats``)."""
        if self.llm_engine.prefill is None:
            raise ValueError("this engine prefills its prompts itself (RuntimeConfig(prefill_workers=0))")
        return self.llm_engine.prefill.stats()

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for every prompt (a string or token ids); outputs in prompt order."""
        prompts = _as_batch(prompts)
        params = _params_for(prompts, sampling_params)
        ids = [self.llm_engine.add_request(p, s) for p, s in zip(prompts, params)]
        final: dict[str, RequestOutput] = {}
        progress = tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm)
        try:
            while len(final) < len(ids):
                for output in self.llm_engine.step():
                    if output.finished:
                        final[output.request_id] = output
                        progress.update(1)
        finally:
            progress.close()
            for request_id in ids:
                if request_id not in final:
                    self.llm_engine.abort(request_id)
        return [final[i] for i in ids]

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Outputs of one request as it advances; ``delta_text`` holds each new piece."""
        request_id = self.llm_engine.add_request(prompt, sampling_params)
        finished = False
        try:
            while not finished:
                for output in self.llm_engine.step():
                    if output.request_id == request_id:
                        finished = output.finished
                        yield output
        finally:
            if not finished:
                self.llm_engine.abort(request_id)

    def chat(self, messages: list[dict[str, str]], sampling_params: SamplingParams | None = None) -> RequestOutput:
        """Reply to a conversation, formatted with the tokenizer's chat template."""
        return self.generate([self.chat_prompt(messages)], sampling_params)[0]

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """The token ids of ``messages`` under the tokenizer's chat template."""
        return apply_chat_template(self.engine.tokenizer, messages)


def apply_chat_template(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` formatted by ``tokenizer``'s chat template, ready for the
    assistant's reply; ``ValueError`` when there is no template or the messages do not fit it."""
    return tokenizer.encode(chat_text(tokenizer, messages), add_special_tokens=False)


def chat_text(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The text of ``messages`` formatted by ``tokenizer``'s chat template, ready for the
    assistant's reply; ``ValueError`` when there is no template or the messages do not fit it."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template: use completions")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - template errors come as many types
        raise ValueError(f"the chat template cannot format these messages: {exc}") from None


def _as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(p, int) for p in prompts):
        return [prompts]
    return prompts


def _params_for(prompts: list[Prompt], params: SamplingParams | Sequence[SamplingParams] | None):
    if params is None or isinstance(params, SamplingParams):
        return [params or SamplingParams()] * len(prompts)
    params = list(params)
    if len(params) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
    return params
