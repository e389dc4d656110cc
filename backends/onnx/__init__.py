"""The ONNX backend: kiln graphs exported as ONNX models of standard ops (opset 23), and
the exported step graph of an engine run with onnxruntime.

- ``builder.py``: the ONNX graph under construction (onnx-graphsurgeon) and its helpers;
- ``ops.py``, ``attention.py``: the export of each op; ``table.py``: which op exports how;
- ``export.py``: graph -> ``onnx.ModelProto``, unsupported ops refused by name first;
- ``session.py``: an exported graph run by onnxruntime with torch tensors in and out.

See docs/onnx.md. ``backends.onnx`` imports ``ir``; onnx, onnx-graphsurgeon and
onnxruntime are imported only by these modules.
"""

from .builder import OnnxExportError
from .export import OPSET, UnsupportedOpsError, check_exportable, export_onnx
from .session import OnnxSession
from .table import EXPORTS, unexportable

__all__ = ["EXPORTS", "OPSET", "OnnxExportError", "OnnxSession", "UnsupportedOpsError", "check_exportable",
           "export_onnx", "unexportable"]
