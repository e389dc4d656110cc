"""Train the bundled tiny model (``models/``): a 2M-parameter Llama with its own
byte-level BPE tokenizer, on the Python documentation that ships with Python
(``pydoc_data.topics``, under the PSF license).

    python tools/train_tiny_model.py --out models --device cuda    # about a minute on an H100

The tokenizer is trained on the CPU; the model on ``--device``. Topics are split by name
into training and held-out text; the script prints both losses.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

EOS = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def corpus() -> tuple[list[str], list[str]]:
    """The documentation topics, split into training and held-out texts."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    held_out = set(names[::20])
    return [topics[n] for n in names if n not in held_out], [topics[n] for n in names if n in held_out]


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, unk_token=None)
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text) + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def batches(stream: torch.Tensor, batch: int, seq: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, len(stream) - seq - 1, (batch,), generator=generator)
        chunk = torch.stack([stream[s: s + seq + 1] for s in starts.tolist()])
        yield chunk[:, :-1], chunk[:, 1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="models")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--vocab", type=int, default=2048)
    args = parser.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    train_texts, held_out_texts = corpus()
    tokenizer = train_tokenizer(train_texts, args.vocab)
    train, held_out = token_stream(tokenizer, train_texts), token_stream(tokenizer, held_out_texts)
    print(f"tokens: {len(train)} training, {len(held_out)} held out; vocabulary {len(tokenizer)}")

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=192, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0,
        tie_word_embeddings=True, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        dtype="float32",
    )
    model = LlamaForCausalLM(config).to(args.device)
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 30)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    generator = torch.Generator().manual_seed(0)
    data = batches(train, args.batch, args.seq, generator)
    autocast = torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.device != "cpu")
    start = time.time()
    for step in range(1, args.steps + 1):
        x, y = (t.to(args.device) for t in next(data))
        with autocast:
            logits = model(input_ids=x, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 500 == 0 or step == args.steps:
            print(f"step {step}: training loss {loss.item():.3f} ({time.time() - start:.0f} s)", flush=True)

    model.eval()
    with torch.no_grad(), autocast:
        losses = []
        for i in range(0, len(held_out) - args.seq - 1, args.seq):
            chunk = held_out[i: i + args.seq + 1].to(args.device)[None]
            logits = model(input_ids=chunk[:, :-1], use_cache=False).logits
            losses.append(torch.nn.functional.cross_entropy(logits[0].float(), chunk[0, 1:]).item())
    print(f"held-out loss {sum(losses) / len(losses):.3f}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.to("cpu", torch.float32).save_pretrained(out)
    tokenizer.save_pretrained(out)
    prompt = "The for statement"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    sample = model.generate(ids, max_new_tokens=40, do_sample=False)
    print("sample:", repr(tokenizer.decode(sample[0])))


if __name__ == "__main__":
    main()
