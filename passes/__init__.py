"""Passes over kiln graphs: the pass manager, the declarative pattern rewriter, and the
built-in passes, each registered by name, with named pipelines of them.

``passes`` imports ``ir`` and nothing else of kiln.
"""

from collections.abc import Sequence

from ..ir import Graph
from .canonicalize import CANONICAL_RULES
from .cleanup import eliminate_common_subexpressions, eliminate_dead_code, fold_constants
from .fusion import FUSION_RULES, RAISE_RULES, ROTARY_RULES, SELECTION_RULES
from .profiles import EngineLimits, ProfilePlan, Workload, select_profiles
from .kv_layout import linear_kv_cache, specialize
from .paged import METADATA, PagedAttentionError, page_attention
from .complex_rotary import COMPLEX_ROTARY_RULES
from .mla import MLA_RULES
from .moe import MOE_RULES
from .moe_grouped import GROUPED_MOE_RULES
from .moe_dense import DENSE_MOE_RULES
from .moe_sparsemixer import SPARSEMIXER_RULES
from .written_attention import raise_written_attention
from .manager import Pass, PassError, PassManager, PassRecord, format_records, rewrite_pass
from .partition import PartitionError, partition, partition_tensor_parallel
from .partition_experts import check_dispatch
from .partition_pipeline import CostModel, PipelineStages, pipeline_schedule, run_stages, split_pipeline
from .partition_rules import SELECTION_THROUGH_COLLECTIVES
from .partition_simulator import simulate_ranks
from .pattern import AttrVar, Match, Pattern, is_splat, trace
from .rewriter import RewriteLimitError, Rewrites, Rule, rewrite
from .quantization import (ACTIVATION_QUANT_RULES, QUANTIZED_FUSION_RULES, QUANTIZED_SELECTION_RULES, QuantConfig,
                           fp8_kv_cache, quantize_pass)

canonicalize = rewrite_pass("canonicalize", CANONICAL_RULES,
                            "algebraic identities, data-movement chains and cast chains")
fold = Pass("fold_constants", fold_constants, "ops over constants become (lazy) constants")
cse = Pass("cse", eliminate_common_subexpressions, "merge identical nodes and small constants")
dce = Pass("dce", eliminate_dead_code, "drop unused nodes and constants")
_raise_rules = rewrite_pass("raise", RAISE_RULES + COMPLEX_ROTARY_RULES + MOE_RULES + GROUPED_MOE_RULES
                            + DENSE_MOE_RULES + SPARSEMIXER_RULES + MLA_RULES)
raise_ops = Pass("raise", lambda graph: raise_written_attention(graph) + _raise_rules.run(graph),
                 "recognize written-out attention (causal masks, ALiBi), rms_norm, rotary, mixture-of-experts "
                 "routing and latent attention among primitives")
fuse = rewrite_pass("fuse", FUSION_RULES + QUANTIZED_FUSION_RULES,
                    "residual+RMSNorm, QKV and gate/up GEMMs (quantized too), gated activations")
fuse_rotary = rewrite_pass("fuse_rotary", ROTARY_RULES + CANONICAL_RULES,
                           "the fused QKV split into heads, with rotary on q and k, becomes one qkv_rotary")
select_logits = rewrite_pass("select_logits",
                             SELECTION_RULES + SELECTION_THROUGH_COLLECTIVES + QUANTIZED_SELECTION_RULES,
                             "compute the final layers only for the tokens whose logits are asked for")
fuse_activation_quant = rewrite_pass("fuse_activation_quant", ACTIVATION_QUANT_RULES,
                                     "norms feeding W8A8 layers emit the E4M3/INT8 codes and per-token scales")
paged_attention = Pass("paged_attention", page_attention,
                       "a causal LM graph becomes the runtime's step graph over a paged KV cache",
                       changes_signature=True)

kv_cache_fp8 = Pass("fp8_kv_cache", fp8_kv_cache, "the paged KV caches hold E4M3 (kv_cache_dtype='fp8')",
                    changes_signature=True)
linear_kv = Pass("linear_kv_cache", linear_kv_cache,
                 "paged caches become linear per-slot caches (one block of max_seq_len per sequence)",
                 changes_signature=True)

PASSES: dict[str, Pass] = {p.name: p for p in (canonicalize, fold, cse, dce, raise_ops, fuse, paged_attention,
                                                fuse_rotary, select_logits, fuse_activation_quant,
                                                linear_kv)}
# A pipeline is its passes in order; these are repeated until a round changes nothing.
PIPELINES: dict[str, tuple[str, ...]] = {
    "cleanup": ("canonicalize", "fold_constants", "cse", "dce"),
}
PIPELINES["reference"] = (*PIPELINES["cleanup"], "raise", "fuse", "paged_attention", "fuse_rotary",
                          "select_logits", "fuse_activation_quant")
# The CUDA backend's kernels implement the reference pipeline's fused ops over paged
# blocks; TensorRT-RTX has linear per-slot caches only.
PIPELINES["cuda"] = PIPELINES["reference"]
PIPELINES["tensorrt"] = (*PIPELINES["reference"], "linear_kv_cache")


def pipeline(name: str, quantization: QuantConfig | None = None, kv_cache_dtype: str = "auto",
             calibration: Sequence = ()) -> list[Pass]:
    """The passes of the named pipeline; with ``quantization``, its ``quantize`` stage
    after ``raise`` (before partitioning and fusion), calibrated on ``calibration`` (token
    id batches) where the scheme needs it; with ``kv_cache_dtype="fp8"``,
    ``fp8_kv_cache`` after ``paged_attention``."""
    if name not in PIPELINES:
        raise KeyError(f"unknown pipeline {name!r}; pipelines are {', '.join(sorted(PIPELINES))}")
    passes = [PASSES[p] for p in PIPELINES[name]]
    if quantization is not None:
        if "raise" not in PIPELINES[name]:
            raise ValueError(f"pipeline {name!r} has no raise stage to quantize after")
        passes.insert(PIPELINES[name].index("raise") + 1, quantize_pass(quantization, calibration))
    if kv_cache_dtype == "fp8":
        passes.insert(passes.index(PASSES["paged_attention"]) + 1, kv_cache_fp8)
    elif kv_cache_dtype != "auto":
        raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} is not one of 'auto' (the model's dtype) and 'fp8'")
    return passes


def pipeline_manager(name: str, quantization: QuantConfig | None = None, kv_cache_dtype: str = "auto",
                     calibration: Sequence = (), **options) -> PassManager:
    """A ``PassManager`` that runs the named pipeline (quantized with ``quantization`` and
    ``calibration``, its KV cache in ``kv_cache_dtype``) to a fixpoint; ``options`` are
    the manager's (``debug``, ``dump_after``, ``dump``)."""
    return PassManager(pipeline(name, quantization, kv_cache_dtype, calibration), until_stable=True, **options)


def run_pipeline(name: str, graph: Graph, tp: int = 1, quantization: QuantConfig | None = None,
                 kv_cache_dtype: str = "auto", calibration: Sequence = (), ep: int = 1,
                 expert_dispatch: str = "all_reduce", **options) -> list[PassRecord]:
    """Run the named pipeline (quantized, its KV cache in ``kv_cache_dtype``: see
    ``pipeline``) on ``graph`` to a fixpoint; with ``tp`` > 1, the passes before fusion run
    first, then ``partition`` (once), then the whole pipeline but its run-once stages, so
    that the fusions see the sharded graph. ``ep`` (1 or ``tp``) splits the experts of
    mixture-of-experts layers across the ``tp`` ranks too, their tokens dispatched by
    ``expert_dispatch`` (``"all_reduce"``, the default, or ``"all_to_all"``: see
    ``partition_tensor_parallel``)."""
    if ep not in (1, tp):
        raise ValueError(f"expert parallelism splits experts across the tensor-parallel ranks: ep must be 1 or "
                         f"tp ({tp}), got {ep}")
    check_dispatch(expert_dispatch, ep)
    passes = pipeline(name, quantization, kv_cache_dtype, calibration)
    if tp == 1:
        return PassManager(passes, until_stable=True, **options).run(graph)
    before = passes[:[p.name for p in passes].index("fuse")]
    debug = options.get("debug", False)
    records = PassManager(before, until_stable=True, debug=debug).run(graph)
    records += PassManager([partition(tp, expert_parallel=ep > 1, expert_dispatch=expert_dispatch)],
                           debug=debug).run(graph)
    return records + PassManager([p for p in passes if not p.once], until_stable=True, **options).run(graph)


__all__ = [
    "AttrVar", "CANONICAL_RULES", "MOE_RULES", "EngineLimits", "ProfilePlan", "Workload", "select_profiles",
    "FUSION_RULES", "RAISE_RULES", "ROTARY_RULES", "SELECTION_RULES", "METADATA", "PagedAttentionError", "Match",
    "PASSES", "PIPELINES", "Pass", "PassError", "PassManager", "PassRecord", "Pattern", "QuantConfig",
    "RewriteLimitError", "Rewrites", "Rule", "canonicalize", "cse", "dce", "eliminate_common_subexpressions",
    "eliminate_dead_code", "fold", "fold_constants", "fp8_kv_cache", "kv_cache_fp8", "quantize_pass",
    "format_records", "fuse", "fuse_activation_quant", "fuse_rotary", "raise_ops", "is_splat", "linear_kv",
    "linear_kv_cache",
    "page_attention", "specialize", "paged_attention", "pipeline", "pipeline_manager", "rewrite", "rewrite_pass",
    "select_logits", "trace", "PartitionError", "partition", "partition_tensor_parallel", "run_pipeline",
    "CostModel", "PipelineStages", "pipeline_schedule", "run_stages", "simulate_ranks", "split_pipeline", "MLA_RULES",
    "GROUPED_MOE_RULES", "raise_written_attention", "COMPLEX_ROTARY_RULES", "DENSE_MOE_RULES", "SPARSEMIXER_RULES",
    "check_dispatch",
]
