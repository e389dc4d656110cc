"""Run the load profile (``locustfile.py``) against ``kiln serve`` on loopback and print
its report: requests/s, output tokens/s, time-to-first-token and inter-token-latency
percentiles, how each request ended, and what the server showed meanwhile (the most
sequences it ran at once, against ``--max-num-seqs``) and afterwards (sequences and KV
blocks still held: both must be 0).

    python bench/load/run.py ENGINE_OR_MODEL --users 32 --requests 400 --run-time 60

The server is started with ``kiln serve`` and stopped with SIGTERM (it must drain and
exit 0). Exit status 1 when a request ended incomplete, or the server leaked or
overran its limits.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

API_KEY = "load-test"
LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", headers={"authorization": f"Bearer {API_KEY}"}, timeout=10).text
    return {name: float(value) for name, value in re.findall(r"^(kiln_\w+) (\S+)$", text, re.M)}


def _wait_up(url: str, server: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"kiln serve exited with {server.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"kiln serve did not come up in {seconds} s")


class Watcher(threading.Thread):
    """Polls the server's metrics while the load runs: the most sequences running at once."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.stop, self.max_running, self.max_waiting = url, threading.Event(), 0.0, 0.0

    def run(self) -> None:
        while not self.stop.wait(0.1):
            try:
                seen = _metrics(self.url)
            except httpx.HTTPError:
                continue
            self.max_running = max(self.max_running, seen["kiln_running_sequences"])
            self.max_waiting = max(self.max_waiting, seen["kiln_queue_length"])


def run(args: argparse.Namespace) -> dict:
    """Serve, load, check; the report."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    serve = [sys.executable, "-m", "kiln.cli", "serve", args.model, "--port", str(port), "--api-key", API_KEY,
             "--model-name", "tiny", "--max-num-seqs", str(args.max_num_seqs), "--max-queued", str(args.max_queued)]
    serve += ["--num-blocks", str(args.num_blocks)] if args.num_blocks else []
    serve += ["--device", args.device] if args.device else []
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe nobody reads: a chatty server must never block on it
    server = subprocess.Popen(serve, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_up(url, server)
        watcher = Watcher(url)
        watcher.start()
        with tempfile.TemporaryDirectory() as scratch:
            report_path = Path(scratch) / "report.json"
            env = {**os.environ, "KILN_LOAD_REPORT": str(report_path), "KILN_LOAD_REQUESTS": str(args.requests),
                   "KILN_API_KEY": API_KEY, "KILN_LONG_PROMPT_TOKENS": str(args.long_prompt_tokens)}
            locust = subprocess.run(
                [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
                 "-u", str(args.users), "-r", str(args.users), "-t", f"{args.run_time}s", "--stop-timeout", "60",
                 "--host", url, "--loglevel", "WARNING", "--exit-code-on-error", "0"],
                env=env, capture_output=True, text=True, timeout=args.run_time + 120)
            if not report_path.is_file():
                raise RuntimeError(f"locust wrote no report:\n{locust.stdout[-3000:]}\n{locust.stderr[-3000:]}")
            report = json.loads(report_path.read_text())
        watcher.stop.set()
        watcher.join()
        time.sleep(0.5)
        after = _metrics(url)
        report["server"] = {"max_running_sequences": watcher.max_running, "max_num_seqs": args.max_num_seqs,
                            "max_queue_length": watcher.max_waiting,
                            "running_after": after["kiln_running_sequences"],
                            "kv_cache_usage_after": after["kiln_kv_cache_usage"]}
        server.send_signal(signal.SIGTERM)
        report["server"]["exit_code"] = server.wait(timeout=60)
        if not healthy(report) or report["outcomes"].get("error"):
            log.seek(0)
            report["server_log_tail"] = log.read()[-4000:].splitlines()
        return report
    finally:
        if server.poll() is None:
            server.kill()
        log.close()


def healthy(report: dict) -> bool:
    """Whether every request ended as it should and the server kept its limits and leaked nothing."""
    server = report["server"]
    return (report["outcomes"].get("incomplete", 0) == 0 and server["max_running_sequences"] <= server["max_num_seqs"]
            and server["running_after"] == 0 and server["kv_cache_usage_after"] == 0 and server["exit_code"] == 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="an engine directory or a checkpoint directory")
    parser.add_argument("--users", type=int, default=16, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=200, help="requests in all")
    parser.add_argument("--run-time", type=int, default=60, help="seconds at most")
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--max-queued", type=int, default=256)
    parser.add_argument("--num-blocks", type=int, default=None)
    parser.add_argument("--long-prompt-tokens", type=int, default=200, help="words in a long prompt")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args()
    report = run(args)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if healthy(report) else 1


if __name__ == "__main__":
    sys.exit(main())
