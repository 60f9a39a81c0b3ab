"""Where benchmark results go: ``benchmarks/results/<kind>_<device>.json``, with the device named."""

from __future__ import annotations

import json
import platform
import threading
import time
from pathlib import Path

import torch


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
    """Peak memory during a block: CUDA max allocated, or on CPU the RSS high-water above the start
    (sampled every 2 ms from /proc/self/statm)."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * 4096

    def _poll(self, base: int) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - base)
            time.sleep(0.002)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._thread = threading.Thread(target=self._poll, args=(self._rss(),), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
