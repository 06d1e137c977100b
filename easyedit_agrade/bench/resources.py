"""Wall time and peak memory of a code block: resident set size sampled by a thread, CUDA peak allocation."""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Optional


def current_rss_bytes() -> int:
    """This process's resident set size (psutil when present, else /proc, else the peak from getrusage)."""
    try:
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)
    except ImportError:  # pragma: no cover - psutil is a transitive dependency, but stay usable without it
        pass
    try:  # pragma: no cover
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@dataclass
class Measurement:
    seconds: float = 0.0
    rss_before_mb: float = 0.0
    peak_rss_mb: float = 0.0
    cuda_max_allocated_mb: Optional[float] = None
    samples: int = 0
    _t0: float = field(default=0.0, repr=False)

    @property
    def rss_delta_mb(self) -> float:
        return max(self.peak_rss_mb - self.rss_before_mb, 0.0)

    def as_dict(self) -> dict:
        return {"edit_seconds": self.seconds, "rss_before_mb": round(self.rss_before_mb, 1),
                "peak_rss_mb": round(self.peak_rss_mb, 1), "rss_delta_mb": round(self.rss_delta_mb, 1),
                "cuda_max_allocated_mb": None if self.cuda_max_allocated_mb is None
                else round(self.cuda_max_allocated_mb, 1)}


class measure:
    """``with measure() as m: ...`` — wall time, peak RSS (sampled every ``interval`` s) and CUDA peak."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.result = Measurement()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cuda = False

    def _sample(self) -> None:
        peak = self.result.peak_rss_mb
        while not self._stop.wait(self.interval):
            peak = max(peak, current_rss_bytes() / 2**20)
            self.result.samples += 1
            self.result.peak_rss_mb = peak

    def __enter__(self) -> Measurement:
        try:
            import torch

            self._cuda = torch.cuda.is_available()
            if self._cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
        except ImportError:  # pragma: no cover
            self._cuda = False
        rss = current_rss_bytes() / 2**20
        self.result.rss_before_mb = self.result.peak_rss_mb = rss
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
        self._thread.start()
        self.result._t0 = time.perf_counter()
        return self.result

    def __exit__(self, *exc) -> None:
        if self._cuda:
            import torch

            torch.cuda.synchronize()
            self.result.cuda_max_allocated_mb = torch.cuda.max_memory_allocated() / 2**20
        self.result.seconds = time.perf_counter() - self.result._t0
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.result.peak_rss_mb = max(self.result.peak_rss_mb, current_rss_bytes() / 2**20)
