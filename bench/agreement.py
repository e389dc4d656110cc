"""How long kiln's greedy tokens agree with transformers', and how close the first
disagreement is to a tie.

On a real checkpoint (SmolLM2-135M-Instruct, say) and four chat prompts, 32 greedy tokens
each from transformers in bfloat16 and in float32, and from kiln in bfloat16: the cuda
backend as tuned, the cuda backend with cuBLAS for every linear layer, and the reference
backend on the GPU. For each it prints how many leading tokens agree with each
transformers run, and, where a run leaves transformers bf16, the gap between the two
leading logits of transformers (bf16 and float32) at that token: a gap near bf16's
rounding step is a tie that any change of summation order may flip.

    python bench/agreement.py CHECKPOINT [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain photosynthesis in one sentence.", "List three prime numbers."]
TOKENS = 32


def _agree(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _gap(model, ids: list[int]) -> float:
    """The gap between the two largest next-token logits of ``model`` after ``ids``."""
    with torch.no_grad():
        logits = model(torch.tensor([ids], device="cuda")).logits[0, -1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1])


def kiln_runs(path: str) -> dict[str, list[list[int]]]:
    """Greedy tokens of each kiln variant, per prompt (the prompt ids first, under 'prompt')."""
    import kiln

    params = kiln.SamplingParams(max_tokens=TOKENS, min_tokens=TOKENS, temperature=0)
    runs: dict[str, list[list[int]]] = {}
    variants = {"kiln cuda (tuned)": ("cuda", None), "kiln cuda (cuBLAS only)": ("cuda", "linear"),
                "kiln reference backend": ("cpu", None)}
    for name, (target, drop) in variants.items():
        engine = kiln.compile(path, target=target, dtype="bfloat16", max_batch_size=4, max_seq_len=512)
        engine.kernel_configs.pop(drop, None)
        llm = kiln.LLM(engine, kiln.RuntimeConfig(device="cuda", num_blocks=256))
        outputs = llm.generate([llm.chat_prompt([{"role": "user", "content": p}]) for p in PROMPTS], params)
        runs.setdefault("prompt", [o.prompt_token_ids for o in outputs])
        runs[name] = [list(o.token_ids) for o in outputs]
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    runs = kiln_runs(args.checkpoint)
    models = {dtype: AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=dtype).cuda().eval()
              for dtype in (torch.bfloat16, torch.float32)}
    for dtype, model in models.items():
        name = f"transformers {str(dtype).removeprefix('torch.')}"
        runs[name] = []
        for prompt in runs["prompt"]:
            ids = torch.tensor([prompt], device="cuda")
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False)
            runs[name].append(out[0, ids.shape[1]:].tolist())
    rows = []
    for name, tokens in runs.items():
        if name in ("prompt", "transformers bfloat16"):
            continue
        for i, prompt in enumerate(PROMPTS):
            row = {"run": name, "prompt": prompt,
                   "agree_bf16": _agree(tokens[i], runs["transformers bfloat16"][i]),
                   "agree_fp32": _agree(tokens[i], runs["transformers float32"][i])}
            if row["agree_bf16"] < TOKENS:
                prefix = runs["prompt"][i] + tokens[i][:row["agree_bf16"]]
                row["gap_bf16"] = _gap(models[torch.bfloat16], prefix)
                row["gap_fp32"] = _gap(models[torch.float32], prefix)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
