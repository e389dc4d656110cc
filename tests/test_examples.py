"""The examples in examples/ run, and their property tests pass."""

import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_custom_pass_example(capsys):
    module = runpy.run_path(str(EXAMPLES / "custom_pass.py"))
    module["main"]()
    out = capsys.readouterr().out
    assert "%1 = silu(%0)" in out and "sigmoid" not in out
    module["test_fuse_silu_preserves_semantics"]()
