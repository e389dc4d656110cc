"""Writers of pre-quantized checkpoints, from the formats' documentation, for the tests.

Each takes a tiny random Llama, draws random codes, scales and zero points for every
projection of its decoder layers, packs them into the format's tensors, writes the
checkpoint (safetensors, config.json with its ``quantization_config``, the bundled
tokenizer) and sets the model's weights to the dequantized values, so that the model
becomes the float reference of the checkpoint.

- GPTQ (AutoGPTQ / GPTQModel): ``qweight`` int32 ``[in * bits / 32, out]``, the codes of
  input rows ``8 r .. 8 r + 7`` (4 bits) in word ``r``, lowest bits first; ``qzeros`` int32
  ``[groups, out * bits / 32]`` packed the same way along the output dim, v1 storing
  ``zero - 1``; ``scales`` fp16 ``[groups, out]``; ``g_idx`` int32, each input's group.
- AWQ (AutoAWQ GEMM): ``qweight`` int32 ``[in, out / 8]``, ``qzeros`` int32 ``[groups, out / 8]``,
  nibble ``k`` of word ``j`` holding output ``8 j + [0, 2, 4, 6, 1, 3, 5, 7][k]``.
- FP8: ``weight`` E4M3, ``weight_scale`` (scalar or ``[out, 1]``), ``input_scale`` scalar;
  llm-compressor's ``compressed-tensors`` the same, its scheme in ``config_groups``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from hf_models import copy_tokenizer
from safetensors.torch import save_file

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def pack_words(codes: np.ndarray, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Pack codes ``[rows, cols]`` along the last dim, ``32 / bits`` a word, the code at
    position ``order[k]`` of each run into bits ``k * bits`` (in order by default), as int32."""
    per = 32 // bits
    order = order or tuple(range(per))
    runs = codes.astype(np.uint32).reshape(codes.shape[0], -1, per)
    words = np.zeros(runs.shape[:2], dtype=np.uint32)
    for k, position in enumerate(order):
        words |= (runs[:, :, position] & ((1 << bits) - 1)) << np.uint32(bits * k)
    return torch.from_numpy(words.view(np.int32).copy())


def _linears(model):
    for layer_index, layer in enumerate(model.model.layers):
        for path in PROJECTIONS:
            module = layer.get_submodule(path)
            yield f"model.layers.{layer_index}.{path}", module


def _random_grouped(rng, out_features, in_features, group, bits, sym, v1):
    groups = in_features // group
    codes = rng.integers(0, 2 ** bits, (out_features, in_features))
    if sym:
        zeros = np.full((out_features, groups), 2 ** (bits - 1))
    else:  # v1 stores zero - 1 in a nibble, so it cannot hold a zero point of 0
        zeros = rng.integers(1 if v1 else 0, 2 ** bits, (out_features, groups))
    scales = torch.from_numpy(rng.uniform(0.002, 0.02, (out_features, groups))).half()
    return codes, zeros, scales


def write_gptq(model, directory: Path, bits: int = 4, group: int = 32, sym: bool = False, v1: bool = True,
               act_order: bool = False, seed: int = 0) -> Path:
    """A GPTQ checkpoint of ``model``'s projections; ``act_order`` shuffles the groups (desc_act)."""
    rng = np.random.default_rng(seed)
    tensors = _plain_tensors(model)
    for prefix, linear in _linears(model):
        out_features, in_features = linear.weight.shape
        codes, zeros, scales = _random_grouped(rng, out_features, in_features, group, bits, sym, v1)
        g_idx = np.arange(in_features) // group
        if act_order:
            g_idx = np.empty(in_features, dtype=np.int64)
            g_idx[rng.permutation(in_features)] = np.arange(in_features) // group
        expanded_zeros, expanded_scales = zeros[:, g_idx], scales.float()[:, g_idx]
        linear.weight.data = (torch.from_numpy(codes - expanded_zeros).float() * expanded_scales)
        tensors[f"{prefix}.qweight"] = pack_words(codes, bits).T.contiguous()
        tensors[f"{prefix}.qzeros"] = pack_words((zeros - 1 if v1 else zeros).T.copy(), bits)
        tensors[f"{prefix}.scales"] = scales.T.contiguous()
        tensors[f"{prefix}.g_idx"] = torch.from_numpy(g_idx).int()
    config = {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": sym, "desc_act": act_order,
              "checkpoint_format": "gptq" if v1 else "gptq_v2"}
    return _write(model, directory, tensors, config)


def write_awq(model, directory: Path, group: int = 32, seed: int = 0) -> Path:
    """An AWQ (GEMM) checkpoint of ``model``'s projections."""
    order = (0, 2, 4, 6, 1, 3, 5, 7)
    rng = np.random.default_rng(seed)
    tensors = _plain_tensors(model)
    for prefix, linear in _linears(model):
        out_features, in_features = linear.weight.shape
        codes, zeros, scales = _random_grouped(rng, out_features, in_features, group, 4, False, False)
        g_idx = np.arange(in_features) // group
        linear.weight.data = torch.from_numpy(codes - zeros[:, g_idx]).float() * scales.float()[:, g_idx]
        tensors[f"{prefix}.qweight"] = pack_words(codes.T.copy(), 4, order)
        tensors[f"{prefix}.qzeros"] = pack_words(zeros.T.copy(), 4, order)
        tensors[f"{prefix}.scales"] = scales.T.contiguous()
    config = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}
    return _write(model, directory, tensors, config)


def write_fp8(model, directory: Path, per_channel: bool, static: bool, compressed: bool = False,
              seed: int = 0) -> Path:
    """An FP8 checkpoint of ``model``'s projections (``quant_method: fp8``, or llm-compressor's
    ``compressed-tensors``, whose per-tensor scales are ``[1]``); sets each projection's
    ``input_scale`` attribute (static) for the reference."""
    generator = torch.Generator().manual_seed(seed)
    tensors = _plain_tensors(model)
    for prefix, linear in _linears(model):
        out_features, in_features = linear.weight.shape
        codes = (torch.randn(out_features, in_features, generator=generator) * 100).to(torch.float8_e4m3fn)
        shape = (out_features, 1) if per_channel else (1,) if compressed else ()
        scale = torch.rand(shape, generator=generator) * 1e-3 + 1e-4
        linear.weight.data = codes.float() * scale
        tensors[f"{prefix}.weight"] = codes
        tensors[f"{prefix}.weight_scale"] = scale
        if static:
            linear.input_scale = torch.tensor(0.02 + 0.01 * torch.rand((), generator=generator).item())
            tensors[f"{prefix}.input_scale"] = linear.input_scale.clone()
    config = {"quant_method": "fp8", "activation_scheme": "static" if static else "dynamic"}
    if compressed:
        group = {"targets": ["Linear"],
                 "weights": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
                             "strategy": "channel" if per_channel else "tensor"},
                 "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": not static,
                                       "strategy": "tensor" if static else "token"}}
        config = {"quant_method": "compressed-tensors", "format": "float-quantized",
                  "config_groups": {"group_0": group}, "ignore": ["lm_head"]}
    return _write(model, directory, tensors, config)


def _plain_tensors(model) -> dict[str, torch.Tensor]:
    quantized = {f"{prefix}.weight" for prefix, _ in _linears(model)}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in quantized}


def _write(model, directory: Path, tensors: dict[str, torch.Tensor], quantization_config: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / "model.safetensors")
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    copy_tokenizer(directory)
    return directory
