"""``OnnxSession``: an exported kiln graph run by onnxruntime on the CPU, called with
torch tensors by input name and returning torch tensors in the graph's output order."""

from __future__ import annotations

import os

import numpy as np
import onnx
import torch


class OnnxSession:
    """An onnxruntime session over an exported graph (a model, its bytes or a path)."""

    def __init__(self, model: onnx.ModelProto | bytes | str | os.PathLike):
        import onnxruntime as ort

        source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(source if isinstance(source, bytes) else os.fspath(source), options,
                                            providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, **inputs: torch.Tensor) -> list[torch.Tensor]:
        missing = set(self.input_names) - set(inputs)
        if missing:
            raise ValueError(f"missing inputs {sorted(missing)}; the model takes {self.input_names}")
        feeds = {name: np.ascontiguousarray(inputs[name].detach().cpu().numpy()) for name in self.input_names}
        return [torch.from_numpy(np.asarray(out)) for out in self.session.run(self.output_names, feeds)]
