"""Peak memory of a block of code: CPU resident set size (sampled) and CUDA max allocated."""
from __future__ import annotations

import threading

import torch

__all__ = ["PeakMemory"]


class PeakMemory:
    """``with PeakMemory(device) as pm: ...`` then ``pm.result()`` ->
    ``{"rss_peak_mb", "rss_start_mb"[, "cuda_peak_mb"]}``.

    The process RSS is sampled every ``interval`` seconds by a daemon thread (``ru_maxrss`` cannot be
    reset, so it could not tell one phase's peak from an earlier one); on CUDA the allocator's peak
    is reset on entry and read on exit."""

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.05):
        import psutil

        self._proc = psutil.Process()
        self.device = torch.device(device)
        self.interval = interval
        self._peak = 0
        self._start = 0
        self._cuda = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._start = self._peak = self._proc.memory_info().rss
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._peak = max(self._peak, self._proc.memory_info().rss)
        if self.device.type == "cuda":
            self._cuda = torch.cuda.max_memory_allocated(self.device)

    def result(self) -> dict:
        out = {"rss_peak_mb": round(self._peak / 2**20, 1), "rss_start_mb": round(self._start / 2**20, 1)}
        if self._cuda is not None:
            out["cuda_peak_mb"] = round(self._cuda / 2**20, 1)
        return out
