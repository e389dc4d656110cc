"""The load profile (``bench/load``, locust) in a small size against ``kiln serve`` on
loopback: every request ends complete (or given up by its client), the server never runs
more than ``--max-num-seqs`` sequences, holds nothing afterwards and drains on SIGTERM."""

import json
import subprocess
import sys
from pathlib import Path

RUN = Path(__file__).resolve().parents[1] / "bench" / "load" / "run.py"


def test_a_small_load_profile_ends_every_request_and_leaks_nothing(saved_engine, tmp_path):
    report_path = tmp_path / "load.json"
    result = subprocess.run([sys.executable, str(RUN), str(saved_engine), "--users", "8", "--requests", "60",
                             "--run-time", "60", "--max-num-seqs", "4", "--long-prompt-tokens", "100",
                             "--json", str(report_path)], capture_output=True, text=True, timeout=400)
    assert report_path.is_file(), result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(report_path.read_text())
    print(json.dumps(report))
    assert result.returncode == 0, report
    outcomes = report["outcomes"]
    assert set(outcomes) <= {"complete", "gave_up"} and sum(outcomes.values()) == 60 and outcomes["gave_up"] > 0
    assert report["server"]["max_running_sequences"] == 4 and report["server"]["max_queue_length"] > 0
    assert report["ttft_ms"]["p99"] >= report["ttft_ms"]["p50"] > 0 and report["itl_ms"]["p50"] > 0
    assert report["output_tokens_per_second"] > 0
