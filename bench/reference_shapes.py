"""Why the reference backend's batch-1 decode disagreed with itself on the GPU (the
baseline: 10.7-11.5 tok/s counted through ``LLM.stream``, 17-21 through ``generate``).

The hypothesis: its paged attention calls SDPA with a new key length every step, and
cuDNN attention (preferred on sm90) builds a plan on the host for each new shape, so the
first pass over a range of context lengths is slow and later passes are not, whichever
API counts them. Two checks, on one GPU:

- ``sdpa``: SDPA as the reference backend calls it (bf16, 32 query / 8 KV heads of 128,
  one query, a boolean mask), the first call at each new key length against a repeat,
  with cuDNN attention allowed and then disabled;
- ``kiln``: the reference backend on CUDA, 4 layers of the Llama-3.1-8B shape, stream
  and generate over new context lengths and over lengths seen before, then with cuDNN
  attention disabled.

    python bench/reference_shapes.py
"""

from __future__ import annotations

import random
import statistics
import time

import torch
import torch.nn.functional as F


def _ms(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def sdpa(lengths: range) -> str:
    """Median ms of the first SDPA call at each key length in ``lengths``, and of a repeat."""
    first, again = [], []
    for length in lengths:
        q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, 8, length, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        mask = torch.ones(1, 1, 1, length, device="cuda", dtype=torch.bool)

        def call(q=q, k=k, v=v, mask=mask):
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

        first.append(_ms(call))
        again.append(_ms(call))
    return f"first call {statistics.median(first):.2f} ms, repeat {statistics.median(again):.3f} ms"


def kiln_passes() -> None:
    """Decode rates of the reference backend on CUDA, first and later passes over context lengths."""
    import kiln
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
                         num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    engine = kiln.compile(model, target="cpu", max_batch_size=4, max_seq_len=1024, max_num_tokens=1024)
    llm = kiln.LLM(engine, kiln.RuntimeConfig(device="cuda", num_blocks=256, cuda_graphs="off"))
    rng = random.Random(0)
    params = kiln.SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)

    def stream(prompt_len: int) -> float:
        times = []
        start = time.perf_counter()
        for _ in llm.stream([rng.randrange(1000, 100000) for _ in range(prompt_len)], params):
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return (len(times) - 1) / (times[-1] - times[0])

    def generate(prompt_len: int) -> float:
        return 128e3 / _ms(lambda: llm.generate([[rng.randrange(1000, 100000) for _ in range(prompt_len)]], params))

    stream(16)  # compiles and warms the small shapes
    passes = (("stream, contexts 129-256 new", stream, 128), ("generate, same contexts", generate, 128),
              ("stream, same contexts", stream, 128), ("generate, 257-384 new", generate, 256),
              ("stream, same contexts", stream, 256))
    for label, fn, prompt_len in passes:
        print(f"kiln reference backend: {label}: {fn(prompt_len):.1f} tok/s", flush=True)
    torch.backends.cuda.enable_cudnn_sdp(False)
    print(f"kiln reference backend, cuDNN attention off: stream, contexts 513-640 new: {stream(512):.1f} tok/s")


def main() -> None:
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "cuDNN", torch.backends.cudnn.version())
    print("SDPA, cuDNN allowed:", sdpa(range(129, 161)), flush=True)
    torch.backends.cuda.enable_cudnn_sdp(False)
    print("SDPA, cuDNN off:    ", sdpa(range(161, 193)), flush=True)
    torch.backends.cuda.enable_cudnn_sdp(True)
    kiln_passes()


if __name__ == "__main__":
    main()
