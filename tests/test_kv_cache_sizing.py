"""The KV cache is sized from the memory the weights leave: a device whose free memory the
test controls (free = total - the bytes of the weights materialized on it so far)."""

from __future__ import annotations

import dataclasses

from kiln.runtime import LLMEngine, RuntimeConfig, kv_cache


def test_the_cache_gets_what_the_weights_and_activations_leave(bundled_engine, monkeypatch):
    weight_bytes = sum(t.numel() * t.element_size() for t in bundled_engine.weights("cpu").values())
    engine = dataclasses.replace(bundled_engine, _weights={}, _steps={})  # none on the "device" yet
    block_bytes = engine.cache_spec.bytes_per_token() * 16
    useful_bytes = engine.info.max_batch_size * (engine.info.max_seq_len // 16) * block_bytes
    reserve = max(engine.info.workspace_bytes.values())
    total = int((weight_bytes + reserve + useful_bytes // 2) / 0.9)  # room for about half the useful blocks

    def on_the_device(device):
        loaded = sum(t.numel() * t.element_size() for weights in engine._weights.values() for t in weights.values())
        return total - loaded, total

    monkeypatch.setattr(kv_cache, "available_memory", on_the_device)
    llm = LLMEngine(engine, RuntimeConfig(device="cpu", memory_fraction=0.9))
    assert len(llm.blocks.blocks) == (int(total * 0.9) - weight_bytes - reserve) // block_bytes
    assert len(llm.blocks.blocks) * block_bytes + weight_bytes + reserve <= 0.9 * total
