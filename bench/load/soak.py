"""A soak of ``kiln serve``: many requests (10,000 by default) from a fixed number of
concurrent clients, mixing streaming and non-streaming, short and long prompts and
clients that give up; the server's resident memory sampled as it goes. It writes the
samples as JSON and plots resident memory against requests served.

    python bench/load/soak.py ENGINE_OR_MODEL --requests 10000 --json soak.json --plot soak.png

Flat after warm-up means: the growth between the end of the first tenth and the end is
small (reported as ``growth_after_warmup_mib``); every request must end complete,
given up, or refused with a message, and the server must hold nothing afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import API_KEY, _free_port, _metrics, _wait_up  # noqa: E402

WORDS = "the for statement iterates over the items of any sequence in order while a loop runs".split()


async def _one(client: httpx.AsyncClient, rng: random.Random, long_words: int) -> str:
    words = long_words if rng.random() < 0.2 else rng.randint(2, 12)
    body = {"model": "tiny", "prompt": " ".join(rng.choice(WORDS) for _ in range(words)),
            "max_tokens": rng.randint(1, 16), "temperature": rng.choice([0, 0.8]), "ignore_eos": True}
    kind = rng.random()
    if kind < 0.5:
        response = await client.post("/v1/completions", json=body)
        return "complete" if response.status_code == 200 else f"http {response.status_code}"
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        if response.status_code != 200:
            return f"http {response.status_code}"
        lines = 0
        async for line in response.aiter_lines():
            lines += line.startswith("data: ")
            if kind > 0.9 and lines == 1:
                return "gave_up"
            if line == "data: [DONE]":
                return "complete"
    return "incomplete"


async def _soak(url: str, pid: int, args: argparse.Namespace) -> tuple[list[tuple[int, float]], dict[str, int]]:
    process, rng = psutil.Process(pid), random.Random(args.seed)
    samples, outcomes, served = [], {}, 0
    queue: asyncio.Queue = asyncio.Queue()
    for _ in range(args.requests):
        queue.put_nowait(None)

    async def client_loop(client):
        nonlocal served
        while not queue.empty():
            queue.get_nowait()
            outcome = await _one(client, rng, args.long_prompt_words)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            served += 1
            if served % args.sample_every == 0:
                samples.append((served, process.memory_info().rss / 2**20))
                if args.json:  # as it goes, so that a long soak cut short still shows its curve
                    Path(args.json).write_text(json.dumps({"samples": samples, "outcomes": outcomes}) + "\n")

    headers = {"authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120,
                                 limits=httpx.Limits(max_connections=args.concurrency)) as client:
        samples.append((0, process.memory_info().rss / 2**20))
        await asyncio.gather(*(client_loop(client) for _ in range(args.concurrency)))
    return samples, outcomes


def plot(samples: list[tuple[int, float]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([s[0] for s in samples], [s[1] for s in samples], marker=".", linewidth=1)
    ax.set_xlabel("requests served")
    ax.set_ylabel("server resident memory (MiB)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="an engine directory or a checkpoint directory")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--long-prompt-words", type=int, default=150)
    parser.add_argument("--sample-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "kiln.cli", "serve", args.model, "--port", str(port),
                               "--api-key", API_KEY, "--model-name", "tiny", "--max-num-seqs", str(args.max_num_seqs)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_up(url, server)
        start = time.perf_counter()
        samples, outcomes = asyncio.run(_soak(url, server.pid, args))
        seconds = time.perf_counter() - start
        after = _metrics(url)
    finally:
        server.terminate()
        server.wait(timeout=60)
    warm = samples[max(1, len(samples) // 10)][1]
    report = {"requests": args.requests, "seconds": round(seconds, 1), "outcomes": outcomes,
              "rss_start_mib": round(samples[0][1], 1), "rss_after_warmup_mib": round(warm, 1),
              "rss_end_mib": round(samples[-1][1], 1), "growth_after_warmup_mib": round(samples[-1][1] - warm, 1),
              "running_after": after["kiln_running_sequences"], "kv_cache_usage_after": after["kiln_kv_cache_usage"],
              "samples": samples}
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report) + "\n")
    if args.plot:
        plot(samples, args.plot, f"kiln serve, {args.requests} requests, {args.concurrency} clients")
    return 0


if __name__ == "__main__":
    sys.exit(main())
