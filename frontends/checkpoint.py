"""Read a Hugging Face checkpoint directory offline: config, safetensors index (headers
only, single-file or sharded) and tokenizer, with a clear error for each way a
checkpoint can be broken."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import FrontendError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
    "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorRef:
    """Where a checkpoint tensor lives, and what it is, read from the file header."""

    file: Path
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def where(self) -> str:
        return self.file.name

    @property
    def describe(self) -> str:
        return f"{self.file.name}:{self.key}"

    def load(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read this tensor (and cast it to ``dtype``)."""
        from safetensors import safe_open

        with safe_open(self.file, framework="pt") as f:
            tensor = f.get_tensor(self.key)
        return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory: its config, its tensors (not loaded) and its tokenizer."""

    path: Path
    config: Any  # transformers.PretrainedConfig
    tensors: dict[str, TensorRef]
    tokenizer: Any  # transformers.PreTrainedTokenizerBase or None


def read_checkpoint(path: str | Path, require_tokenizer: bool = True) -> Checkpoint:
    """Read ``path`` (headers only); raise ``FrontendError`` naming any problem."""
    path = Path(path)
    if not path.is_dir():
        raise FrontendError(f"checkpoint {path} is not a directory")
    return Checkpoint(path, _config(path), _tensors(path), _tokenizer(path, require_tokenizer))


def _config(path: Path) -> Any:
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise FrontendError(f"checkpoint {path} has no config.json")
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as exc:
        raise FrontendError(f"cannot read {path / 'config.json'}: {exc}") from None


def _tensor_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise FrontendError(f"cannot read {index}: {exc}") from None
        files = sorted({path / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FrontendError(f"{index.name} names shards that are missing: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = f" (found {', '.join(pickled)}: kiln loads no pickle files)" if pickled else ""
        raise FrontendError(f"checkpoint {path} has no safetensors weights{hint}")
    return files


def _tensors(path: Path) -> dict[str, TensorRef]:
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, TensorRef] = {}
    for file in _tensor_files(path):
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    view = f.get_slice(key)
                    dtype = SAFETENSORS_DTYPES.get(view.get_dtype())
                    if dtype is None:
                        raise FrontendError(f"tensor {key} in {file.name} has dtype {view.get_dtype()}, "
                                            "which kiln cannot load")
                    tensors[key] = TensorRef(file, key, dtype, tuple(view.get_shape()))
        except (SafetensorError, OSError, ValueError) as exc:
            if isinstance(exc, FrontendError):
                raise
            raise FrontendError(f"{file.name} is not a valid safetensors file: {exc}") from None
    return tensors


def _tokenizer(path: Path, required: bool) -> Any:
    from transformers import AutoTokenizer

    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        if required:
            raise FrontendError(f"checkpoint {path} has no tokenizer (tokenizer.json or tokenizer_config.json)")
        return None
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - tokenizer loaders raise many kinds of error
        raise FrontendError(f"cannot load the tokenizer of {path}: {exc}") from None
