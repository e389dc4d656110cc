"""Engine directories: build once, load fast, no pickle. This module reads and writes
the files; ``runtime/engine.py`` says what an engine's manifest holds.

    manifest.json      kiln version, target, backend, dtype, quantization, parallelism,
                       limits, profiles, stop tokens, the kernel configurations tuned at
                       build time and the GPU they were tuned on, the workspace of each
                       profile, and a SHA-256 per file (over its 16 MiB chunks' digests)
    graph.kiln         the final IR as text
    tensorrt.plan      (tensorrt backend) the serialized TensorRT plan, and its timing cache
    executor.py        the executor generated from it (readable; regenerated and compared on load)
    weights.safetensors   (weights.rank<r>.safetensors, one per rank, under tensor parallelism;
                       per stage under pipeline parallelism: see ``runtime/pipeline_files.py``)
    config.json, tokenizer files, chat template

``read_engine`` checks the manifest (format, kiln version, target, and the GPU at hand
against the one a CUDA engine was built for) and every file's hash (a file the manifest
does not list, a name that is not a plain file name, or a link is refused), parses the
graph, checks that the executor is the one kiln generates for it, and reads the weights
(safetensors only); it runs no pass. Nothing is loaded with ``trust_remote_code``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..ir import Graph, parse, verify
from ..version import __version__
from .executor import generate_executor
from .pipeline_files import stage_files

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


def weights_file(rank: int, ranks: int) -> str:
    """The name of rank ``rank``'s weights file in an engine of ``ranks`` tensor-parallel ranks."""
    return WEIGHTS if ranks == 1 else f"weights.rank{rank}.safetensors"


def write_engine(path: str | os.PathLike, graph: Graph, executor_source: str,
                 weights: Sequence[Mapping[str, torch.Tensor]] | Mapping[str, Mapping[str, torch.Tensor]],
                 config: Any, tokenizer: Any, fields: Mapping[str, Any], artifacts: Mapping[str, bytes] | None = None,
                 texts: Mapping[str, str] | None = None) -> Path:
    """Write an engine directory at ``path`` (created; its engine files are replaced): the
    graph's text, the executor, each rank's weights (or weights files by name), the text
    files ``texts`` (file name -> text: a pipeline's stages), config and tokenizer, the
    backend's ``artifacts`` (file name -> bytes: TensorRT plans), and a manifest of
    ``fields`` with the format, the kiln version and every file's hash."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / GRAPH).write_text(str(graph))
    (out / EXECUTOR).write_text(executor_source)
    for name, text in (texts or {}).items():
        (out / name).write_text(text)
    named = weights if isinstance(weights, Mapping) else \
        {weights_file(rank, len(weights)): tensors for rank, tensors in enumerate(weights)}
    for name, tensors in named.items():
        save_file({key: t.contiguous() for key, t in tensors.items()}, str(out / name), metadata={"format": "pt"})
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
    """Every file of the engine is one that its manifest lists, by a plain name, as a
    regular file inside ``root`` (no link, no path), with the hash the manifest gives."""
    listed = manifest.get("files")
    if not isinstance(listed, dict) or not all(isinstance(v, str) for v in listed.values()):
        raise EngineLoadError(f"{root / MANIFEST} has no table of file hashes")
    for name in listed:
        if not isinstance(name, str) or name in ("", ".", "..", MANIFEST) or Path(name).name != name:
            raise EngineLoadError(f"{root / MANIFEST} lists {name!r}, which is not a file name of the engine")
    unlisted = sorted(p.name for p in root.iterdir() if p.name != MANIFEST and p.name not in listed)
    if unlisted:
        raise EngineLoadError(f"engine {root} holds {unlisted[:5]}, which its {MANIFEST} does not list")
    for name, digest in listed.items():
        file = root / name
        if file.is_symlink() or not file.is_file():
            raise EngineLoadError(f"engine {root} is missing {name}" if not file.exists() else
                                  f"engine file {file} is not a regular file (links are refused)")
        if _sha256(file) != digest:
            raise EngineLoadError(f"engine file {file} does not match its hash in {MANIFEST}: it was changed "
                                  "after the build")
    ranks, stages = manifest.get("tp", 1), manifest.get("pp", 1)
    weights = stage_files(stages, ranks) if stages > 1 else [weights_file(rank, ranks) for rank in range(ranks)]
    for required in (GRAPH, EXECUTOR, *weights):
        if required not in listed:
            raise EngineLoadError(f"engine {root} is missing {required}")


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


def read_engine(path: str | os.PathLike, target: str | None = None, rank: int = 0) -> EngineDirectory:
    """Read the engine in directory ``path``, with tensor-parallel rank ``rank``'s weights
    (a pipeline-parallel engine's graph has no weights: its ranks read their stage's, see
    ``pipeline_files.read_stage``); refuse one built for another ``target`` (when given),
    by another kiln version, with a changed file, or, where a GPU is present, a CUDA
    engine built for another GPU."""
    root = Path(path)
    manifest = read_manifest(root)
    if target is not None and manifest["target"] != target:
        raise EngineLoadError(f"engine {root} was built for target {manifest['target']!r}, not {target!r}")
    _check_files(root, manifest)
    _check_gpu(root, manifest)
    graph = parse((root / GRAPH).read_text())
    ranks, stages = manifest.get("tp", 1), manifest.get("pp", 1)
    if not 0 <= rank < ranks * stages:
        raise EngineLoadError(f"engine {root} has {ranks * stages} ranks; there is no rank {rank}")
    if stages == 1:
        _bind_weights(graph, root / weights_file(rank, ranks))
    verify(graph)
    source = (root / EXECUTOR).read_text()
    if source != generate_executor(graph, manifest["backend"], __version__):
        raise EngineLoadError(f"{root / EXECUTOR} is not the executor kiln generates for {GRAPH}")
    names = manifest.get("artifacts", [])
    if not isinstance(names, list) or any(name not in manifest["files"] for name in names):
        raise EngineLoadError(f"{root / MANIFEST} names artifacts {names!r} that are not files of the engine")
    artifacts = {name: (root / name).read_bytes() for name in names}
    return EngineDirectory(root, manifest, graph, source, _tokenizer(root), _config(root), artifacts)


def _bind_weights(graph: Graph, file: Path) -> None:
    weights = load_file(str(file))
    missing = [n for n, v in graph.constants.items() if (v.uses or v in graph.outputs) and n not in weights]
    if missing:
        raise EngineLoadError(f"{file} lacks constants {missing[:5]}")
    graph.bind_constants({n: weights[n] for n in graph.constants if n in weights})


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

        return PreTrainedTokenizerFast.from_pretrained(str(root), trust_remote_code=False, local_files_only=True)
    if (root / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(root), trust_remote_code=False, local_files_only=True)
    return None


def _config(root: Path) -> dict | None:
    """The model's config.json as a dict (the runtime needs nothing from it)."""
    return json.loads((root / "config.json").read_text()) if (root / "config.json").is_file() else None
