"""Errors the frontends raise: each names what was wrong with the model or checkpoint."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class FrontendError(ValueError):
    """A model or checkpoint could not be imported; the message says why."""


class UnsupportedOpsError(FrontendError):
    """The traced program uses ops that kiln does not map; lists each with where it came from."""

    def __init__(self, unsupported: Mapping[str, Sequence[str]]):
        self.unsupported = {op: [p or "<top level>" for p in paths] for op, paths in unsupported.items()}
        lines = []
        for op, paths in sorted(self.unsupported.items()):
            shown = ", ".join(sorted(set(paths))[:4])
            more = len(set(paths)) - 4
            lines.append(f"  - {op} (from {shown}{f' and {more} more' if more > 0 else ''})")
        super().__init__(f"{len(lines)} ops have no kiln mapping:\n" + "\n".join(lines))
