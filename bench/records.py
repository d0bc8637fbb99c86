"""JSON-lines output shared by the benchmarks: one record per line to a file or stdout."""
from __future__ import annotations

import json
from typing import IO

__all__ = ["Records"]


class Records:
    """Collects records and writes each as one JSON line (to ``path``, else stdout) as it comes."""

    def __init__(self, path: str | None = None):
        self.items: list[dict] = []
        self._fh: IO[str] | None = open(path, "w") if path else None

    @property
    def to_file(self) -> bool:
        return self._fh is not None

    def emit(self, rec: dict) -> None:
        self.items.append(rec)
        line = json.dumps(rec)
        if self._fh is not None:
            self._fh.write(line + "\n")
            self._fh.flush()
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
