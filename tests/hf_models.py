"""Tiny random-weight configs of the decoder architectures kiln verifies, and helpers
that write them as checkpoint directories with the bundled tokenizer."""

import shutil
from pathlib import Path

import torch
import transformers

BUNDLED = Path(__file__).resolve().parents[1] / "models"
VOCAB = 2048  # the bundled tokenizer's
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

# name: (config class, model class, options beyond COMMON)
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama-2-mha": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4)),
    "llama-3.1": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters=LLAMA3_ROPE, max_position_embeddings=256)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=5)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=16)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16, sliding_window=4)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=16, sliding_window=4)),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(partial_rotary_factor=0.5)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(pad_token_id=0)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(partial_rotary_factor=0.25)),
    "gpt-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(rotary_pct=0.25)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(embedding_multiplier=2.0, residual_multiplier=0.5,
                                                            logits_scaling=4.0, attention_multiplier=0.1)),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(pad_token_id=0)),
    "cohere": ("CohereConfig", "CohereForCausalLM", {}),
    "glm": ("GlmConfig", "GlmForCausalLM", dict(head_dim=16, pad_token_id=0)),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", {}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4)),
    # squared ReLU and xIELU MLPs, OPT's positions counted along the mask
    "nemotron": ("NemotronConfig", "NemotronForCausalLM", dict(partial_rotary_factor=0.5)),
    "persimmon": ("PersimmonConfig", "PersimmonForCausalLM", dict(partial_rotary_factor=0.5)),
    "arcee": ("ArceeConfig", "ArceeForCausalLM", dict(bos_token_id=1, eos_token_id=2)),
    "bitnet": ("BitNetConfig", "BitNetForCausalLM", dict(bos_token_id=1, eos_token_id=2)),
    "apertus": ("ApertusConfig", "ApertusForCausalLM", {}),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=256,
                                               pad_token_id=1)),
    # mixture of experts: 4 experts, 2 per token
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2-moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2,
                                                              moe_intermediate_size=32,
                                                              shared_expert_intermediate_size=64)),
    "qwen3-moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2, head_dim=16,
                                                              moe_intermediate_size=32, norm_topk_prob=True,
                                                              mlp_only_layers=[0])),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2, pad_token_id=0,
                                                    eos_token_id=1)),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2,
                                                                     embedding_multiplier=2.0,
                                                                     residual_multiplier=0.5)),
    # multi-head latent attention (queries through a low-rank projection too), grouped sigmoid routing over
    # 8 experts in 2 groups with a correction bias, a shared expert, a dense first layer
    "deepseek-v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
        moe_intermediate_size=32, n_shared_experts=1)),
    # DeepSeek-V2: rotary as complex multiplication; Lite-style (queries without a low-rank projection, yarn
    # rope, greedy softmax routing) and with q_lora_rank, group-limited greedy routing and a routing scale
    "deepseek-v2-lite": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1, moe_intermediate_size=32,
        n_shared_experts=1, max_position_embeddings=256, rope_parameters=dict(
            rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64, beta_fast=32,
            beta_slow=1, mscale=0.707, mscale_all_dim=0.707))),
    "deepseek-v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, n_routed_experts=8, n_group=2, topk_group=1, topk_method="group_limited_greedy",
        num_experts_per_tok=2, first_k_dense_replace=1, moe_intermediate_size=32, n_shared_experts=1,
        routed_scaling_factor=2.0)),
    # PhiMoE: sparsemixer routing over 4 experts, layer norms with biases, biased attention and LM head, and
    # Phi-3.5-MoE's longrope (short factors and short_mscale within the original context)
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", dict(
        num_local_experts=4, num_experts_per_tok=2, attention_bias=True, lm_head_bias=True,
        max_position_embeddings=32768, rope_parameters=dict(
            rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=8192, short_mscale=1.2,
            long_mscale=1.5, short_factor=[1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8],
            long_factor=[1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0]))),
    # attention written out by the model: ALiBi (BLOOM, MPT; 6 heads, not a power of two)
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(hidden_size=96, num_attention_heads=6)),
    "mpt": ("MptConfig", "MptForCausalLM", dict(hidden_size=96, num_attention_heads=6, expansion_ratio=2,
                                                max_seq_len=128)),
    # Llama 4: layer 0 rotates (complex rotary), L2-normalizes q and k and attends within chunks of 4 positions,
    # with a dense MLP; layer 1 has no rotary (NoPE) but attention temperature tuning (floor_scale 4), and 4 experts,
    # 1 per token, weighed by sigmoid scores on their inputs, beside a shared expert
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM", dict(
        head_dim=16, intermediate_size_mlp=96, num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,
        no_rope_layers=[1, 0], attention_chunk_size=4, floor_scale=4, attn_scale=0.1)),
    # Falcon's causal mask, written out with its packed-sequence check (diff, cumsum, index); multi-head
    # (multi-query heads index with constants that an export on the meta device loses)
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(multi_query=False)),
}


def random_model(name: str, seed: int = 0) -> torch.nn.Module:
    config_class, model_class, options = ARCHITECTURES[name]
    config = getattr(transformers, config_class)(**{**COMMON, **options})
    torch.manual_seed(seed)
    return getattr(transformers, model_class)(config).eval()


def copy_tokenizer(directory: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(BUNDLED / name, directory / name)


def write_checkpoint(model: torch.nn.Module, directory: Path, **save_options) -> Path:
    model.save_pretrained(directory, **save_options)
    copy_tokenizer(directory)
    return directory
