"""What a stage used: wall time, peak resident memory of this process, peak CUDA memory.

Resident memory is sampled from /proc/self/statm by a background thread (every 10 ms), since a
process's high-water mark (ru_maxrss) cannot be reset between stages; short spikes between two
samples can be missed. CUDA's allocator keeps its own peak, reset at the start of a stage.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from dataclasses import asdict, dataclass

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def release_free_memory() -> None:
    """Hand freed heap pages back to the system (glibc keeps them otherwise), so that a long
    pipeline's next stage starts lean and its measured peak is its own. (No gc.collect: tensors
    are freed by reference counting, and a full collection in a large process costs ~0.2 s.)"""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def resident_bytes() -> int:
    """This process's resident memory now (Linux /proc; elsewhere its peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Usage:
    seconds: float
    peak_host_bytes: int  # resident memory of this process, sampled
    start_host_bytes: int  # resident memory when the stage began
    peak_device_bytes: int  # CUDA allocator's peak (0 without CUDA)

    def to_json(self) -> dict:
        return asdict(self)


class Meter:
    """``with Meter() as m: ...`` then ``m.usage``."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.usage: Usage | None = None
        self._peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, resident_bytes())

    def __enter__(self) -> Meter:
        release_free_memory()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
        self._start = resident_bytes()
        self._peak = self._start
        self._began = time.perf_counter()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, resident_bytes())
        device = torch.cuda.max_memory_allocated() if torch.cuda.is_available() and torch.cuda.is_initialized() else 0
        self.usage = Usage(time.perf_counter() - self._began, self._peak, self._start, int(device))
