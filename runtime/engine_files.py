"""Engine directories: build once, load fast, no pickle. This module reads and writes
the files; ``runtime/engine.py`` says what an engine's manifest holds.

    manifest.json      kiln version, target, backend, dtype, quantization, parallelism,
                       limits, profiles, stop tokens, the kernel configurations tuned at
                       build time and the GPU they were tuned on, the workspace of each
                       profile, and a SHA-256 per file (over its 16 MiB chunks' digests)
    graph.kiln         the final IR as text
    tensorrt.plan      (tensorrt backend) the serialized TensorRT plan, and its timing cache
    executor.py        the executor generated from it (readable; regenerated and compared on load)
    weights.safetensors
    config.json, tokenizer files, chat template

``read_engine`` checks the manifest (format, kiln version, target, and the GPU at hand
against the one a CUDA engine was built for) and every file's hash,
parses the graph, checks that the executor is the one kiln generates for it, and reads
the weights; it runs no pass.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..ir import Graph, parse, verify
from .executor import generate_executor

FORMAT = 2
MANIFEST, GRAPH, EXECUTOR, WEIGHTS = "manifest.json", "graph.kiln", "executor.py", "weights.safetensors"


class EngineLoadError(ValueError):
    """An engine directory that cannot be loaded; says why."""


_CHUNK = 1 << 24


def _sha256(path: Path) -> str:
    """The SHA-256 of the SHA-256 digests of the file's 16 MiB chunks, hashed on parallel
    threads (hashlib releases the GIL): an 8B engine's 16 GB of weights are checked in
    about a second on 16 cores, not ten on one."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = range(0, max(os.fstat(fd).st_size, 1), _CHUNK)
        with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
            digests = pool.map(lambda offset: hashlib.sha256(os.pread(fd, _CHUNK, offset)).digest(), chunks)
            return hashlib.sha256(b"".join(digests)).hexdigest()
    finally:
        os.close(fd)


def write_engine(path: str | os.PathLike, graph: Graph, executor_source: str, weights: Mapping[str, torch.Tensor],
                 config: Any, tokenizer: Any, fields: Mapping[str, Any],
                 artifacts: Mapping[str, bytes] | None = None) -> Path:
    """Write an engine directory at ``path`` (created; its engine files are replaced): the
    graph's text, the executor, the weights, config and tokenizer, the backend's
    ``artifacts`` (file name -> bytes: TensorRT plans), and a manifest of ``fields`` with
    the format, the kiln version and every file's hash."""
    from .. import __version__

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / GRAPH).write_text(str(graph))
    (out / EXECUTOR).write_text(executor_source)
    save_file({name: t.contiguous() for name, t in weights.items()}, str(out / WEIGHTS), metadata={"format": "pt"})
    if isinstance(config, dict):
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    elif config is not None:
        config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    for name, data in (artifacts or {}).items():
        (out / name).write_bytes(data)
    files = sorted(p.name for p in out.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest = {"format": FORMAT, "kiln_version": __version__, **fields, "artifacts": sorted(artifacts or {}),
                "files": {name: _sha256(out / name) for name in files}}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of engine directory ``path``, checked for format and kiln version."""
    from .. import __version__

    root = Path(path)
    if not (root / MANIFEST).is_file():
        raise EngineLoadError(f"{root} is not a kiln engine: it has no {MANIFEST}")
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except json.JSONDecodeError as exc:
        raise EngineLoadError(f"{root / MANIFEST} is not valid JSON: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise EngineLoadError(f"engine {root} has format {manifest.get('format')!r}; this kiln reads format {FORMAT}")
    if manifest.get("kiln_version") != __version__:
        raise EngineLoadError(f"engine {root} was built by kiln {manifest.get('kiln_version')}; this is kiln "
                              f"{__version__}: rebuild it with `kiln build`")
    return manifest


def _check_files(root: Path, manifest: dict) -> None:
    for name, digest in manifest["files"].items():
        file = root / name
        if not file.is_file():
            raise EngineLoadError(f"engine {root} is missing {name}")
        if _sha256(file) != digest:
            raise EngineLoadError(f"engine file {file} does not match its hash in {MANIFEST}: it was changed "
                                  "after the build")


@dataclass(frozen=True)
class EngineDirectory:
    """What an engine directory holds, checked: its manifest, the graph with its weights
    bound and verified, the executor source (the one kiln generates for that graph), the
    tokenizer and the config."""

    root: Path
    manifest: dict
    graph: Graph
    executor_source: str
    tokenizer: Any
    config: dict | None
    artifacts: dict[str, bytes]


def read_engine(path: str | os.PathLike, target: str | None = None, verify_hashes: bool = True) -> EngineDirectory:
    """Read the engine in directory ``path``; refuse one built for another ``target``
    (when given), by another kiln version, with a changed file, or, where a GPU is
    present, a CUDA engine built for another GPU."""
    from .. import __version__

    root = Path(path)
    manifest = read_manifest(root)
    if target is not None and manifest["target"] != target:
        raise EngineLoadError(f"engine {root} was built for target {manifest['target']!r}, not {target!r}")
    if verify_hashes:
        _check_files(root, manifest)
    _check_gpu(root, manifest)
    graph = parse((root / GRAPH).read_text())
    weights = load_file(str(root / WEIGHTS))
    missing = [n for n, v in graph.constants.items() if (v.uses or v in graph.outputs) and n not in weights]
    if missing:
        raise EngineLoadError(f"{root / WEIGHTS} lacks constants {missing[:5]}")
    graph.bind_constants({n: weights[n] for n in graph.constants if n in weights})
    verify(graph)
    source = (root / EXECUTOR).read_text()
    if source != generate_executor(graph, manifest["backend"], __version__):
        raise EngineLoadError(f"{root / EXECUTOR} is not the executor kiln generates for {GRAPH}")
    artifacts = {name: (root / name).read_bytes() for name in manifest.get("artifacts", [])}
    return EngineDirectory(root, manifest, graph, source, _tokenizer(root), _config(root), artifacts)


def _check_gpu(root: Path, manifest: dict) -> None:
    """Refuse an engine of the CUDA backend on a GPU other than the one it was built for."""
    if manifest["backend"] != "cuda" or not torch.cuda.is_available():
        return
    from ..backends.cuda.targets import DeviceMismatchError, check_device

    try:
        check_device(manifest["target"], manifest["tuned_on"], "cuda")
    except DeviceMismatchError as exc:
        raise EngineLoadError(f"engine {root}: {exc}") from None


def _tokenizer(root: Path):
    """The saved tokenizer: the fast tokenizer straight from tokenizer.json when there is
    one (quick to load), else whatever transformers' auto class finds."""
    if (root / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(root))
    if (root / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(root))
    return None


def _config(root: Path) -> dict | None:
    """The model's config.json as a dict (the runtime needs nothing from it)."""
    return json.loads((root / "config.json").read_text()) if (root / "config.json").is_file() else None
