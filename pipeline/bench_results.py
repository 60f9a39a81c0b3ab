"""Where benchmark results go: ``benchmarks/results/<kind>_<device>.json``, with the device named."""

from __future__ import annotations

import json
import platform
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
