"""Where benchmark results go (``benchmarks/results/<kind>_<device>.json``, with the device named) and the
one way peak memory is measured (``PeakMemory``) and reported: in GiB (2^30 bytes), under keys that end
in ``_gib``."""

from __future__ import annotations

import json
import platform
import threading
import time
from pathlib import Path

import torch

GIB = 2**30
"""Bytes per GiB, the unit of every memory figure (keys ``*_gib``)."""


def device_name() -> str:
    """The CUDA device's name, or the CPU's."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"


def write_results(result: dict, kind: str, out: str | None = None) -> Path:
    """Write ``result`` as JSON (default ``benchmarks/results/<kind>_<device>.json``), print it, return the path."""
    path = Path(out or f"benchmarks/results/{kind}_{device_name().replace(' ', '_')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2)
    path.write_text(text + "\n")
    print(text)
    return path


class PeakMemory:
    """Peak memory of a block: on CUDA the max allocated since entry (``torch.cuda.max_memory_allocated``
    after a reset), on CPU the resident set size's high-water above the one at entry (sampled every 2 ms
    from /proc/self/statm). ``read()`` gives the peak so far, inside the block or after it; ``kind``
    names what was measured."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = torch.device(device), 0, threading.Event()
        self.kind = "cuda_max_memory_allocated" if self.device.type == "cuda" else "cpu_rss_above_start"

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * 4096

    def _poll(self, base: int) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - base)
            time.sleep(0.002)

    def read(self) -> int:
        """Peak bytes so far (a device sync on CUDA)."""
        if self.device.type == "cuda" and not self._stop.is_set():
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        return self.peak

    def read_gib(self) -> float:
        return self.read() / GIB

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._thread = threading.Thread(target=self._poll, args=(self._rss(),), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self.read()
        self._stop.set()
        if self.device.type != "cuda":
            self._thread.join()
