"""The tokenizer a GGUF file describes in its metadata, as a ``transformers`` fast tokenizer.

llama.cpp stores a byte-level BPE vocabulary (``tokenizer.ggml.model: gpt2``, the kind that
Llama 3, SmolLM2, Qwen and GPT-2 use) as ``tokenizer.ggml.tokens`` (in the byte-to-unicode
spelling of GPT-2), ``tokenizer.ggml.merges`` (``"a b"`` pairs, best first) and
``tokenizer.ggml.token_type`` (3: control tokens, kept whole and special; 4: user-defined
tokens, kept whole). ``tokenizer.ggml.pre`` names the pre-tokenizer's split: GPT-2's own
by default, Llama 3's for the files that say so. The special tokens come from
``tokenizer.ggml.*_token_id``, the chat template from ``tokenizer.chat_template``.
SentencePiece vocabularies (``llama``) and the others are refused by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import FrontendError

CONTROL, USER_DEFINED = 3, 4

# Llama 3's pre-tokenizer split (llama.cpp's "llama-bpe"), used by the files that name it.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT}


def gguf_tokenizer(metadata: Mapping[str, Any]) -> Any:
    """A ``PreTrainedTokenizerFast`` built from a GGUF's ``tokenizer.*`` metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise FrontendError(f"the GGUF's tokenizer.ggml.model is {kind!r}: kiln builds byte-level BPE ('gpt2') "
                            "tokenizers only")
    tokens = list(metadata["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    split = SPLITS.get(metadata.get("tokenizer.ggml.pre"))
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                           pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                    use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    types = list(metadata.get("tokenizer.ggml.token_type", []))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, types) if kind == CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, kind in zip(tokens, types) if kind == USER_DEFINED])
    special = {name: tokens[metadata[f"tokenizer.ggml.{key}_token_id"]]
               for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                                 ("pad_token", "padding"))
               if metadata.get(f"tokenizer.ggml.{key}_token_id") is not None}
    if metadata.get("tokenizer.ggml.add_bos_token") and "bos_token" in special:
        bos = special["bos_token"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, chat_template=metadata.get("tokenizer.chat_template"),
                                   **special)
