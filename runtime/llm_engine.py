"""The serving loop: requests in, one model step at a time, outputs out.

Each ``LLMEngine.step()`` finishes the step on the device and starts the next: the
scheduler picks the next batch, the model runner runs the engine's executor over the
paged KV cache, and the sampler draws a token for each sequence whose step reached its
last token. The next step is launched before this one's tokens reach the host; then
they are appended, the text decoded and the stop conditions checked, and a
``RequestOutput`` is returned for every request that advanced or ended.
"""

from __future__ import annotations

import itertools
import time
import weakref
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..ir.opdefs.moe_all_to_all import EXCHANGED
from .batch import SequenceStep
from .block_manager import BlockManager
from .engine import Engine
from .kv_cache import CacheLayout, plan_num_blocks
from .model_runner import Feed, ModelRunner
from .outputs import RequestOutput
from .sampler import Sampling, sample_async, score
from .sampling_params import SamplingParams
from .scheduler import Scheduled, Scheduler
from .sequence import PENDING, Sequence


@dataclass(frozen=True)
class RuntimeConfig:
    """How the runtime serves an engine. ``device`` defaults to CUDA for GPU targets and
    the CPU otherwise; ``num_blocks`` fixes the cache size, otherwise it takes
    ``memory_fraction`` of the device's memory less what is in use; ``max_num_seqs`` and
    ``max_num_tokens`` (per step) default to the engine's limits. ``cuda_graphs`` says
    when decode steps' CUDA graphs are captured (for engines of the CUDA backend on a
    GPU): all at start, on first use, or never. ``microbatches`` cuts each step of a
    pipeline-parallel engine into that many micro-batches (default: one per stage);
    ``prefill_workers`` > 0 has prompts prefilled by that many worker processes, their KV
    cache sent back layer by layer (``runtime/disaggregated.py``)."""

    device: str | None = None
    block_size: int = 16
    num_blocks: int | None = None
    memory_fraction: float = 0.9
    max_num_seqs: int | None = None
    max_num_tokens: int | None = None
    prefix_caching: bool = True
    cuda_graphs: str = "all"
    microbatches: int | None = None  # per step, under pipeline parallelism (default: one per stage)
    prefill_workers: int = 0  # > 0: disaggregated serving, prompts prefilled by that many worker processes

    def __post_init__(self) -> None:
        if (self.microbatches is not None and self.microbatches < 1) or self.prefill_workers < 0:
            raise ValueError(f"microbatches must be at least 1 and prefill_workers at least 0, got "
                             f"{self.microbatches} and {self.prefill_workers}")
        if self.cuda_graphs not in ("all", "lazy", "off"):
            raise ValueError(f"cuda_graphs must be 'all' (captured at start), 'lazy' (on first use) or 'off', "
                             f"got {self.cuda_graphs!r}")


def _stop(groups: list) -> None:
    for group in groups:
        group.close()


class InFlight(NamedTuple):
    """A step launched on the device: its sequences, those that sample, and the sampling."""

    seqs: list[Sequence]
    sampling: list[Sequence]
    sampled: Sampling


class LLMEngine:
    """Serves one engine: add requests, call ``step()`` until nothing is left."""

    def __init__(self, engine: Engine, config: RuntimeConfig | None = None):
        config = config or RuntimeConfig()
        self.engine = engine
        info = engine.info
        self.device = torch.device(config.device or ("cpu" if info.target == "cpu" else "cuda"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"engine built for target {info.target!r} needs a CUDA device, and torch sees none")
        spec = engine.cache_spec
        self.block_size = info.max_seq_len if spec.linear else config.block_size
        self.max_num_seqs = min(config.max_num_seqs or info.max_batch_size, info.max_batch_size)
        self.max_num_tokens = min(config.max_num_tokens or info.max_num_tokens, info.max_num_tokens)
        parallel = info.tp * info.pp > 1
        useful = self.max_num_seqs * -(-info.max_seq_len // self.block_size)
        reserve = max(info.workspace_bytes.values(), default=0)
        # The weights go on the device before the cache is sized, so that the cache gets what
        # they leave: here, or on each rank of a parallel engine (the ranks take the fewest blocks).
        cache = CacheLayout(config.num_blocks or 0, self.block_size, config.memory_fraction, useful, reserve)
        local_step = None if parallel else engine.step_function(self.device)
        # kernels that never sync; with pipeline stages, each step's micro-batches run eagerly
        fast = info.backend == "cuda" and self.device.type == "cuda" and info.pp == 1
        sizes = [s for s in info.profiles.cuda_graph_batch_sizes if s <= self.max_num_seqs]
        if any(node.op in EXCHANGED for node in engine.graph.nodes):
            sizes = []  # the experts' all-to-all reads its counts on the host: not capturable
        self.workers = None
        self._stoppable: list = []  # the worker groups, in the order they stop (prefill workers first)
        weakref.finalize(self, _stop, self._stoppable)
        if parallel:
            from .distributed import WorkerGroup

            self.workers = WorkerGroup.start(engine, cache, self.device, config.microbatches, config.prefill_workers)
            self._stoppable.append(self.workers)
            num_blocks = self.workers.num_blocks
            self.caches = self.workers.caches  # rank 0's: its stage's layers, its shard
        else:
            num_blocks = cache.num_blocks or plan_num_blocks(spec, self.block_size, self.device,
                                                             config.memory_fraction, useful, reserve)
            self.caches = spec.allocate(num_blocks, self.block_size, self.device)
        step = self.workers.step if self.workers else local_step
        self.runner = ModelRunner(step, self.caches, self.device, self.block_size,
                                  -(-info.max_seq_len // self.block_size),
                                  sizes if fast and config.cuda_graphs != "off" else (),
                                  info.max_num_tokens if fast else None, self.workers)
        if fast:
            self.runner.warm_up(self.max_num_tokens, info.max_seq_len)
        if config.cuda_graphs == "all":
            self.runner.capture_all()
        self.prefill = None  # the prefill workers of disaggregated serving
        self.blocks = BlockManager(num_blocks, self.block_size, config.prefix_caching and not spec.linear)
        self.scheduler = Scheduler(self.blocks, self.max_num_seqs, self.max_num_tokens)
        if config.prefill_workers:
            from .disaggregated import DisaggregatedScheduler, PrefillWorkers

            if parallel:  # the workers' ranks follow the decode ranks, in their process group
                self.prefill = PrefillWorkers.attach(self.workers, self.block_size, config.prefill_workers)
            else:
                self.prefill = PrefillWorkers.start(engine, self.caches, num_blocks, self.block_size,
                                                    config.prefill_workers)
            self._stoppable.insert(0, self.prefill)  # before the decode ranks' group, whose close waits for all
            self.scheduler = DisaggregatedScheduler(self.blocks, self.max_num_seqs, self.max_num_tokens, self.prefill)
        self.sequences: dict[str, Sequence] = {}
        self.eos = tuple(info.stop_token_ids)
        self._ids = itertools.count()
        self.generated_tokens = 0
        self._inflight: InFlight | None = None  # the step on the device
        self.prompt_tokens = 0

    def close(self) -> None:
        """Stop the parallel and prefill workers, if any (also done when the engine is collected)."""
        _stop(self._stoppable)

    # requests -----------------------------------------------------------------------

    def add_request(self, prompt: str | Seq[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request; return its id. Raises ``ValueError`` for a prompt the engine
        cannot serve (empty, out of vocabulary, too long) or a duplicate id."""
        params = params or SamplingParams()
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.sequences:
            raise ValueError(f"request id {request_id!r} is in use")
        ids = self.engine.encode(prompt)
        biased = [token for token, _ in params.logit_bias]
        for name, tokens in (("stop_token_ids", params.stop_token_ids), ("logit_bias", biased)):
            outside = [t for t in tokens if not 0 <= t < self.engine.vocab_size]
            if outside:
                raise ValueError(f"{name} {outside[:5]} are outside the vocabulary of {self.engine.vocab_size}")
        limit = self.engine.info.max_seq_len
        if len(ids) >= limit:
            raise ValueError(f"the prompt has {len(ids)} tokens; this engine serves at most {limit - 1} "
                             f"(max_seq_len {limit}, one token to generate)")
        longest = min(len(ids) + params.max_tokens, limit)
        if self.blocks.blocks_for(longest) > len(self.blocks.blocks):
            raise ValueError(f"a request of {longest} tokens needs {self.blocks.blocks_for(longest)} cache blocks; "
                             f"the cache has {len(self.blocks.blocks)}")
        seq = Sequence(request_id, prompt if isinstance(prompt, str) else None, ids, params)
        seq.attach_tokenizer(self.engine.tokenizer)
        self.sequences[request_id] = seq
        self.scheduler.add(seq)
        self.prompt_tokens += len(ids)
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Cancel a request and free its blocks; its final output, or None if unknown."""
        seq = self.sequences.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.finish(seq, "abort")
        return self._output(seq)

    def fail_all(self, message: str) -> list[RequestOutput]:
        """End every request with ``message`` as its error and drop the step on the device:
        what the serving loop does when a step raises where the engine could not tell
        which requests it concerned."""
        self._inflight = None
        return [self._fail(seq, message) for seq in list(self.sequences.values())]

    def has_unfinished(self) -> bool:
        """Whether a request still runs or waits, or a step on the device has results to hand out."""
        return self.scheduler.has_work() or self._inflight is not None

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    # the loop -----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Finish one model step and return the outputs of the requests that advanced or
        ended in it; start the next step.

        The next step is launched before this one's tokens reach the host (its sequences'
        new input tokens are read on the device, where this step samples them), unless a
        running request's penalties need those tokens on the host first. Then this step's
        tokens are appended and stop tokens and lengths checked; its text is decoded, and
        stop strings looked for, while the next step runs (a sequence that ended drops the
        next step's token)."""
        outputs: list[RequestOutput] = []
        if self._inflight is None:
            self._inflight = self._launch_next(outputs)
        if self._inflight is None:
            return outputs
        current = self._inflight
        ahead = self._launch_next(outputs, current) if self._can_run_ahead() else None
        try:
            appended = self._collect(current)
        except Exception as exc:  # noqa: BLE001 - sampling failed on the device: this step's requests fail
            appended = []
            outputs += [self._fail(seq, f"{type(exc).__name__}: {exc}") for seq in current.sampling
                        if not seq.finished]
        self._inflight = ahead if ahead is not None else self._launch_next(outputs)
        outputs += self._emit(appended)
        if self._inflight is not None and all(seq.finished for seq in self._inflight.seqs):
            self._inflight = None  # it runs on, but every request in it has ended: nothing to collect
        return outputs

    def _can_run_ahead(self) -> bool:
        """Whether the next step may start before this one's tokens are on the host: not
        while a running request has penalties (the sampler counts its tokens on the host)."""
        return not any(s.params.repetition_penalty != 1.0 or s.params.presence_penalty or s.params.frequency_penalty
                       for s in self.scheduler.running)

    def _launch_next(self, failed: list[RequestOutput], previous: InFlight | None = None) -> InFlight | None:
        """Schedule and launch the next step, if there is work (reading the tokens that
        ``previous`` is still sampling on the device); a step that fails to launch fails
        its requests (their outputs go to ``failed``)."""
        batch = self.scheduler.schedule()
        if not batch:
            return None
        try:
            return self._launch(batch, previous, failed)
        except Exception as exc:  # noqa: BLE001 - a failed step fails its requests, not the engine
            failed += [self._fail(item.seq, f"{type(exc).__name__}: {exc}") for item in batch]
            return None

    def _launch(self, batch: list[Scheduled], previous: InFlight | None, failed: list[RequestOutput]) -> InFlight:
        """Start the step and its sampling on the device; each sampling sequence gets a
        ``PENDING`` token that ``_collect`` fills in (a request whose sampling fails ends,
        its output to ``failed``)."""
        steps, dst, src = [], [], []
        rows = {id(seq): row for row, seq in enumerate(previous.sampling)} if previous else {}
        offset = 0
        for item in batch:
            tokens = item.seq.tokens[item.num_cached:item.num_cached + item.num_tokens]
            if tokens[-1] == PENDING:
                dst.append(offset + len(tokens) - 1)
                src.append(rows[id(item.seq)])
            steps.append(SequenceStep(tokens, item.num_cached, item.seq.block_table))
            offset += len(tokens)
        rows = [item.logit_rows for item in batch]
        feed = Feed(dst, src, previous.sampled.tokens) if dst else None
        logits = self.runner.run(steps, rows, feed)
        sampling = [item.seq for item in batch if item.samples]
        if sum(rows) > len(sampling):
            logits = self._score_prompts(batch, rows, logits)
        for item in batch:
            item.seq.num_cached += item.num_tokens
        sampling, sampled = self._sample(logits, sampling, failed)
        for seq in sampling:
            seq.tokens.append(PENDING)
            seq.pending += 1
        return InFlight([item.seq for item in batch], sampling, sampled)

    def _score_prompts(self, batch: list[Scheduled], rows: list[int], logits: torch.Tensor) -> torch.Tensor:
        """Record the prompt log-probabilities that the step's logits give (row ``r`` of a
        sequence's last ``rows`` scores its next token); the logits of the sampling rows."""
        scored, targets, owners, sampled = [], [], [], []
        at = 0
        for item, count in zip(batch, rows):
            first = item.num_cached + item.num_tokens - count  # the position of the sequence's first row
            for row in range(count - item.samples):
                scored.append(at + row)
                targets.append(item.seq.tokens[first + row + 1])
                owners.append(item.seq)
            if item.samples:
                sampled.append(at + count - 1)
            at += count
        index = torch.tensor(scored, device=logits.device)
        tops = [seq.params.prompt_logprobs for seq in owners]
        for seq, entry in zip(owners, score(logits.index_select(0, index), targets, tops)):
            seq.prompt_logprobs.append(entry)
        return logits.index_select(0, torch.tensor(sampled, dtype=torch.int64, device=logits.device))

    def _sample(self, logits: torch.Tensor, sampling: list[Sequence],
                failed: list[RequestOutput]) -> tuple[list[Sequence], Sampling]:
        """Launch the sampling of ``logits``' rows; if it raises, sample each row alone to
        find the requests that make it fail, end those (outputs to ``failed``) and sample
        the others. The sequences that sample, and their sampling."""
        try:
            return sampling, sample_async(logits, sampling, self.eos)
        except Exception:  # noqa: BLE001 - one request's sampling must not fail the others
            pass
        rows = []
        for row, seq in enumerate(sampling):
            try:
                sample_async(logits[row:row + 1], [seq], self.eos)
                rows.append(row)
            except Exception as exc:  # noqa: BLE001
                failed.append(self._fail(seq, f"sampling failed: {type(exc).__name__}: {exc}"))
        kept = [sampling[row] for row in rows]
        return kept, sample_async(logits[rows], kept, self.eos)

    def _collect(self, step: InFlight) -> list[tuple[Sequence, int]]:
        """Put each sequence's new token in its place (a sequence that ended meanwhile
        drops it), end those that reached a stop token or their length, and record the
        cache blocks the step filled."""
        appended = []
        now = time.monotonic()
        for seq, (token, logprobs) in zip(step.sampling, step.sampled.wait()):
            if seq.finished:
                continue
            seq.tokens[len(seq.tokens) - seq.pending] = token
            seq.pending -= 1
            seq.first_token_time = seq.first_token_time or now
            seq.last_token_time = now
            self.generated_tokens += 1
            if logprobs is not None:
                seq.logprobs.append(logprobs)
            params = seq.params
            if token in params.stop_token_ids or (token in self.eos and not params.ignore_eos):
                self.scheduler.finish(seq, "stop")
            elif (len(seq.output_ids) >= params.max_tokens
                  or len(seq.prompt_ids) + len(seq.output_ids) >= self.engine.info.max_seq_len):
                self.scheduler.finish(seq, "length")
            appended.append((seq, token))
        for seq in step.seqs:
            if not seq.finished:
                self.blocks.commit(seq)
        return appended

    def _emit(self, appended: list[tuple[Sequence, int]]) -> list[RequestOutput]:
        """Decode the text of the appended tokens, end the sequences that reached a stop
        string, and make the outputs (aborted requests give none)."""
        outputs = []
        for seq, token in appended:
            if seq.request_id not in self.sequences:
                continue
            try:
                self._detokenize(seq, token)
            except Exception as exc:  # noqa: BLE001 - e.g. a tokenizer failure: this request only
                outputs.append(self._fail(seq, f"{type(exc).__name__}: {exc}"))
                continue
            outputs.append(self._output(seq))
            if seq.finished:
                self.sequences.pop(seq.request_id, None)
        return outputs

    def _detokenize(self, seq: Sequence, token: int) -> None:
        seq.text += seq.detokenizer.add(token)
        params = seq.params
        stop = next((s for s in params.stop if s in seq.text[-(len(s) + 64):]), None) if params.stop else None
        if stop is not None:
            cut = seq.text.find(stop)
            seq.text = seq.text[:cut + len(stop)] if params.include_stop_str_in_output else seq.text[:cut]
            self.scheduler.finish(seq, "stop")
            seq.finish_reason = "stop"  # also where the token that completed it reached the length

    def _fail(self, seq: Sequence, message: str) -> RequestOutput:
        self.scheduler.finish(seq, "error")
        self.sequences.pop(seq.request_id, None)
        return self._output(seq, error=message)

    def _output(self, seq: Sequence, error: str | None = None) -> RequestOutput:
        """The output of ``seq`` now; text that could still turn into a stop string is held back."""
        hold = 0 if seq.finished or not seq.params.stop else max(len(s) for s in seq.params.stop) - 1
        visible = max(len(seq.text) - hold, seq.emitted_text)
        delta_text = seq.text[seq.emitted_text:visible]
        outputs = seq.output_ids
        delta_ids = outputs[seq.emitted_tokens:]
        seq.emitted_text, seq.emitted_tokens = visible, len(outputs)
        prompt_logprobs = None if seq.params.prompt_logprobs is None else [None, *seq.prompt_logprobs]
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_ids, seq.text[:visible], list(outputs),
                             delta_text, delta_ids, seq.finished, seq.finish_reason, list(seq.logprobs),
                             seq.cached_prompt_tokens, error, prompt_logprobs)
