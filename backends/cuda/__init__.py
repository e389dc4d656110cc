"""The CUDA backend: Triton kernels for kiln's fused ops and paged attention, cuBLAS
GEMMs, launch parameters tuned at build time for the target GPU.

- ``attention``: paged attention (split-KV decode, variable-length prefill), the KV-cache
  write fused in;
- ``mla_attention``: multi-head latent attention (DeepSeek-V2/V3) in the absorbed form over
  a paged latent cache (split-KV decode, variable-length prefill, the cache write);
- ``norms``, ``activations``, ``rotary``: RMSNorm / LayerNorm with the residual add, the
  gated activation, the QKV split with rotary embedding;
- ``kernels``: the kernel table the executor is bound to; ``tuning``: build-time tuning;
  ``targets``: what a GPU target name means and whether a device is one.

Its kernel modules import Triton: import them only where a GPU (or Triton's CPU
interpreter, in tests) runs them. ``backends.cuda`` imports ``ir``, ``passes`` and
``backends.reference``.
"""
