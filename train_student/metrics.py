"""Per-optimizer-step metrics: device-side window sums and the JSONL logs of a run.

``WindowStats`` adds every micro-step's raw term losses, gradient cosines and norms and fired
projections on the device; ``collect`` brings the window to the host in ONE transfer (the step's sync
point; with several data-parallel ranks the same transfer is gathered from every rank and summed).
Gradient norms come from the gradient bank's Gram diagonal (no extra backward); the plain mode
(no AGP, no reweighting: one backward of the weighted sum) has no per-term gradients and logs none.
``JsonlLog`` appends rows to ``metrics.jsonl`` / ``samples.jsonl``; a resumed run truncates them to
the sizes its checkpoint recorded, so they never hold rows of steps that were trained again.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch
import transformers

from schemas.method import LOSS_TERMS, TERMS

SUMMED = 59
"""Length of the fixed part of ``WindowStats.collect``'s flat vector (then one finite flag per sample)."""


class WindowStats:
    """Sums over one accumulation window, kept on ``device`` (terms indexed in LOSS_TERMS)."""

    def __init__(self, device: torch.device, *, loss_scale: float = 1.0):
        """``loss_scale``: the factor the losses were multiplied by before their backward (1/grad_accum);
        the logged norms are those of the unscaled losses' gradients."""
        self.device, self.loss_scale = device, loss_scale
        self.reset()

    def reset(self) -> None:
        zeros = lambda *shape: torch.zeros(*shape, device=self.device)  # noqa: E731
        self.loss_sum, self.count, self.total = zeros(4), zeros(4), zeros(())
        self.cos_sum, self.cos_count, self.fired = zeros(4, 4), zeros(4, 4), zeros(2, 3)
        self.norm_sum, self.norm_count = zeros(4), zeros(4)
        self.finite: list[torch.Tensor] = []
        self.keys: list[str] = []

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, key: str, terms: torch.Tensor, losses: torch.Tensor, total: torch.Tensor,
            stats: dict | None = None) -> None:
        """One micro-step. terms: [n] long term ids (LOSS_TERMS, on device); losses: [n] raw losses;
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
            self.norm_sum.index_add_(0, terms, stats["norms"].float() / self.loss_scale)
            self.norm_count.index_add_(0, terms, torch.ones_like(losses))
            if "fired" in stats and terms.numel() > 1:
                self.fired.index_add_(1, terms[1:] - 1, stats["fired"].float())
        self.finite.append(finite)

    def collect(self, weights: torch.Tensor, *, gather=None, extra=None) -> dict:
        """Host summary of the window; ``weights`` [4] are the term weights used (0 = inactive).

        Returns losses (mean raw loss per present term), loss (mean weighted total), weights, cos
        (mean cosine per term pair), fired (stage-1 / stage-2 projection counts per distillation
        term), samples, and ``nonfinite_key`` (first sample with a NaN/inf loss, or None); with
        per-term gradients also their norms (``grad_norms``).

        ``gather``: ``obj -> [obj of every data-parallel rank]`` (``Dist.gather_data``): the window's sums
        are added over the ranks, so every rank gets the summary of the whole window; ``extra``: any
        picklable value sent along in the same collective, returned as ``summary["extra"]`` (one per rank).
        """
        flat = torch.cat([self.loss_sum, self.count, self.total[None], self.cos_sum.flatten(),
                          self.cos_count.flatten(), self.fired.flatten(), weights.detach().float().to(self.device),
                          self.norm_sum, self.norm_count, torch.stack(self.finite).float() if self.finite
                          else torch.zeros(0, device=self.device)])
        local = flat.tolist()  # the one device->host sync of an optimizer step
        parts = gather((local, self.keys, extra)) if gather is not None else [(local, self.keys, extra)]
        values = [sum(column) for column in zip(*(v[:SUMMED] for v, _, _ in parts))]
        values[47:51] = local[47:51]  # the weights are the same on every rank
        finite = [ok for v, _, _ in parts for ok in v[SUMMED:]]
        keys = [key for _, rank_keys, _ in parts for key in rank_keys]
        loss_sum, count, total = values[0:4], values[4:8], values[8]
        cos_sum, cos_count = values[9:25], values[25:41]
        fired, used = values[41:47], values[47:51]
        norm_sum, norm_count = values[51:55], values[55:59]
        n = len(keys)
        pairs = {f"{LOSS_TERMS[i]}/{LOSS_TERMS[j]}": cos_sum[4 * i + j] / cos_count[4 * i + j]
                 for i in range(4) for j in range(i + 1, 4) if cos_count[4 * i + j]}
        bad = [key for key, ok in zip(keys, finite) if not ok]
        return {"samples": n, "loss": total / max(1, n),
                "losses": {t: loss_sum[i] / count[i] for i, t in enumerate(LOSS_TERMS) if count[i]},
                "weights": {t: used[i] for i, t in enumerate(LOSS_TERMS) if used[i]},
                "cos": pairs,
                "fired": {"anchor": dict(zip(TERMS, fired[0:3])), "pairwise": dict(zip(TERMS,
                                                                                              fired[3:6]))},
                **grad_norms(norm_sum, norm_count, used),
                "nonfinite_key": bad[0] if bad else None,
                **({"extra": [e for _, _, e in parts]} if extra is not None else {})}

def grad_norms(norm_sum: list[float], norm_count: list[float], lambdas: list[float]) -> dict:
    """The window's gradient-norm keys of a metrics row (none without per-term gradients).

    ``grad_norm[t]``: mean over the micro-steps where t was present of ``|grad L_t|`` (unweighted, raw
    loss); ``grad_norm_weighted[t]``: ``lambda_t * grad_norm[t]`` (the lambda in force, before the
    per-capability mix factor); ``grad_ratio[t]`` / ``grad_ratio_weighted[t]``: those of a distillation
    term divided by CE's. Inputs are [4] lists in LOSS_TERMS."""
    mean = {t: norm_sum[i] / norm_count[i] for i, t in enumerate(LOSS_TERMS) if norm_count[i]}
    if "ce" not in mean:
        return {}
    weighted = {t: lambdas[LOSS_TERMS.index(t)] * n for t, n in mean.items()}
    ratio = lambda values: {t: v / values["ce"] if values["ce"] else float("inf")  # noqa: E731
                            for t, v in values.items() if t != "ce"}
    return {"grad_norm": mean, "grad_norm_weighted": weighted, "grad_ratio": ratio(mean),
            "grad_ratio_weighted": ratio(weighted)}


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


def environment(device: torch.device, *, world: int, step: int) -> dict:
    """What a run's numbers depend on beyond its config: the library versions, torch's intra-op threads (a
    CPU run's float sums, hence its weights, change with the thread count), the device and the world size;
    ``step``: where this start of the run began (0, or the checkpoint it resumed)."""
    return {"step": step, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type, "world": world}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
