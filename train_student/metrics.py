"""Per-optimizer-step metrics: device-side window sums and the JSONL logs of a run.

``WindowStats`` adds every micro-step's raw term losses, gradient cosines and fired projections on
the device; ``collect`` brings the window to the host in ONE transfer (the step's sync point).
``JsonlLog`` appends rows to ``metrics.jsonl`` / ``samples.jsonl``; a resumed run truncates them to
the sizes its checkpoint recorded, so they never hold rows of steps that were trained again.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

TERM_ORDER = ("ce", "p", "r", "d")
DISTILL_TERMS = TERM_ORDER[1:]


class WindowStats:
    """Sums over one accumulation window, kept on ``device`` (terms indexed in TERM_ORDER)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        zeros = lambda *shape: torch.zeros(*shape, device=self.device)  # noqa: E731
        self.loss_sum, self.count, self.total = zeros(4), zeros(4), zeros(())
        self.cos_sum, self.cos_count, self.fired = zeros(4, 4), zeros(4, 4), zeros(2, 3)
        self.finite: list[torch.Tensor] = []
        self.keys: list[str] = []

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, key: str, terms: torch.Tensor, losses: torch.Tensor, total: torch.Tensor,
            stats: dict | None = None) -> None:
        """One micro-step. terms: [n] long term ids (TERM_ORDER, on device); losses: [n] raw losses;
        total: the weighted loss; stats: ``cos`` [n, n], ``norms`` [n] and optionally ``fired``
        [2, n-1] of the per-term gradients (see ``agp_step``)."""
        losses = losses.detach().float()
        self.keys.append(key)
        self.loss_sum.index_add_(0, terms, losses)
        self.count.index_add_(0, terms, torch.ones_like(losses))
        self.total += total.detach().float()
        finite = torch.isfinite(losses).all() & torch.isfinite(total.detach())
        if stats is not None:
            pairs = (terms[:, None], terms[None, :])
            self.cos_sum.index_put_(pairs, stats["cos"].float(), accumulate=True)
            self.cos_count.index_put_(pairs, torch.ones_like(stats["cos"], dtype=torch.float32), accumulate=True)
            finite = finite & torch.isfinite(stats["norms"]).all()
            if "fired" in stats and terms.numel() > 1:
                self.fired.index_add_(1, terms[1:] - 1, stats["fired"].float())
        self.finite.append(finite)

    def collect(self, weights: torch.Tensor) -> dict:
        """Host summary of the window; ``weights`` [4] are the term weights used (0 = inactive).

        Returns losses (mean raw loss per present term), loss (mean weighted total), weights, cos
        (mean cosine per term pair), fired (stage-1 / stage-2 projection counts per distillation
        term), samples, and ``nonfinite_key`` (first sample with a NaN/inf loss, or None).
        """
        flat = torch.cat([self.loss_sum, self.count, self.total[None], self.cos_sum.flatten(),
                          self.cos_count.flatten(), self.fired.flatten(), weights.detach().float().to(self.device),
                          torch.stack(self.finite).float()])
        values = flat.tolist()  # the one device->host sync of an optimizer step
        loss_sum, count, total = values[0:4], values[4:8], values[8]
        cos_sum, cos_count = values[9:25], values[25:41]
        fired, used, finite = values[41:47], values[47:51], values[51:]
        n = len(self.keys)
        pairs = {f"{TERM_ORDER[i]}/{TERM_ORDER[j]}": cos_sum[4 * i + j] / cos_count[4 * i + j]
                 for i in range(4) for j in range(i + 1, 4) if cos_count[4 * i + j]}
        bad = [key for key, ok in zip(self.keys, finite) if not ok]
        return {"samples": n, "loss": total / max(1, n),
                "losses": {t: loss_sum[i] / count[i] for i, t in enumerate(TERM_ORDER) if count[i]},
                "weights": {t: used[i] for i, t in enumerate(TERM_ORDER) if used[i]},
                "cos": pairs,
                "fired": {"anchor": dict(zip(DISTILL_TERMS, fired[0:3])), "pairwise": dict(zip(DISTILL_TERMS,
                                                                                              fired[3:6]))},
                "nonfinite_key": bad[0] if bad else None}


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated CUDA memory of ``device``, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20


class JsonlLog:
    """Append-only JSON-lines file, truncated to ``keep_bytes`` when opened (0: start empty)."""

    def __init__(self, path: Path, *, keep_bytes: int = 0):
        self.path = Path(path)
        self.path.touch(exist_ok=True)
        size = self.path.stat().st_size
        if size < keep_bytes:
            raise ValueError(f"{self.path} has {size} bytes, fewer than the {keep_bytes} the checkpoint recorded: "
                             "the log was edited or replaced; restore it or start a new run directory")
        with self.path.open("r+b") as handle:
            handle.truncate(keep_bytes)
        self.handle = self.path.open("a", encoding="utf-8")

    def write(self, row: dict) -> None:
        """Append one row and flush, so the log can be followed while training runs."""
        self.handle.write(json.dumps(row, separators=(",", ":")) + "\n")
        self.handle.flush()

    def size(self) -> int:
        """Bytes written so far (flushes)."""
        self.handle.flush()
        return self.path.stat().st_size

    def close(self) -> None:
        self.handle.close()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
