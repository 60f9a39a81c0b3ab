"""ABLATION / BENCHMARK ONLY: the online-teacher mode, i.e. the reference trainer's approach.

The teacher runs inside the trainer with eager attention and ``output_attentions=True``; the student
materialises every layer's attention the same way; AGP runs per parameter tensor with Python loops
and one host sync per parameter and dot product. ``make train`` never uses it (DESIGN contract 5):
it exists to measure what the offline caches save (``python -m train_student.bench``) and to
compare against the reference. This is the only module of the trainer that loads a teacher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from pipeline.attention.layout import TilingPolicy, build_layout
from pipeline.attention.maps import group_mean, tv_block
from pipeline.data.shards import iter_shard
from pipeline.models.load import decoder_layers, load_model, resolve_model
from pipeline.models.processors import family_of, load_processor
from schemas.method import ROLE_TERM, TERM_ROLE, LayerPlan
from train_student.data import DataError, TrainItem
from train_student.step import autocast_context, student_losses


class OnlineTeacher:
    """A frozen teacher (eager attention) producing the three targets from ``output_attentions``."""

    def __init__(self, model, *, plan: LayerPlan, mid_start: int, mid_end: int):
        self.model = model.eval().requires_grad_(False)
        self.layers = LayerPlan.for_model(decoder_layers(model), mid_start, mid_end)
        self.k = len(plan.mid)

    @torch.no_grad()
    def targets(self, inputs: dict, is_vision: Tensor, roles) -> dict[str, Tensor]:
        """role -> target, shaped like the cached ones (reasoning dense ``[k, S, S]``)."""
        attentions = self.model(**inputs, use_cache=False, output_attentions=True, logits_to_keep=1).attentions
        head_mean = lambda layer: attentions[layer][0].float().mean(0)  # noqa: E731
        targets = {}
        for role in roles:
            layers = self.layers.term_layers(ROLE_TERM[role])
            if ROLE_TERM[role] == "r":
                targets[role] = group_mean(torch.stack([head_mean(layer) for layer in layers]), self.k)
            else:
                targets[role] = tv_block(head_mean(layers[0]), is_vision)
        return targets


def load_online_teacher(teacher: str, *, student_family: str, plan: LayerPlan, mid_start: int, mid_end: int,
                        device: torch.device) -> OnlineTeacher:
    """Load ``teacher`` (directory or known name) with eager attention, bf16 on GPU, fp32 on CPU."""
    teacher_dir = str(resolve_model(teacher))
    family = family_of(teacher_dir)
    if family != student_family:
        raise DataError(f"online teacher {teacher_dir} is a {family} model, the student is {student_family}: "
                        "layouts differ across families; use a teacher of the student's family")
    model = load_model(teacher_dir, dtype="bf16" if device.type == "cuda" else "fp32", attn_implementation="eager")
    return OnlineTeacher(model.to(device), plan=plan, mid_start=mid_start, mid_end=mid_end)


def check_online_layout(teacher_dir: str, student_dir: str, shard: str, tiling: TilingPolicy) -> None:
    """The teacher reads the student's inputs: both processors must lay out the first sample alike."""
    sample = next(iter_shard(shard))
    teacher = build_layout(sample.record, sample.images, load_processor(teacher_dir), tiling=tiling)
    student = build_layout(sample.record, sample.images, load_processor(student_dir), tiling=tiling)
    if teacher.digest != student.digest:
        raise DataError(f"layout mismatch on sample {sample.key}: online teacher digest {teacher.digest} vs student "
                        f"{student.digest}. Likely cause: a different tokenizer or image tiling.")


@dataclass
class OnlineForward:
    """Teacher targets and a student forward with every layer's attention materialised (eager)."""

    model: torch.nn.Module
    teacher: OnlineTeacher
    plan: LayerPlan
    device: torch.device
    autocast_dtype: torch.dtype | None = None
    loss_kind: str = "mse"

    def __call__(self, item: TrainItem, terms) -> dict[str, Tensor]:
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in item.inputs.items()}
        targets = self.teacher.targets(inputs, item.is_vision, [TERM_ROLE[t] for t in terms])
        keep = item.labels.numel() - item.answer_start + 1
        with autocast_context(self.device, self.autocast_dtype):
            out = self.model(**inputs, use_cache=False, output_attentions=True, logits_to_keep=keep)
        maps = {layer: out.attentions[layer][0].float().mean(0) for layer in self.plan.layers(terms)}
        return student_losses(out.logits, maps, replace(item, targets=targets), self.plan, terms, self.device,
                              self.loss_kind)


# ---------------------------------------------------------------- per-parameter AGP (reference layout)
class ParameterGrads:
    """Per-term gradients kept as lists of per-parameter tensors, as the reference trainer keeps them."""

    def __init__(self, params):
        self.params = [p for p in params if p.requires_grad]
        self.rows: dict[int, list[Tensor | None]] = {}
        self.total: list[Tensor | None] = [None] * len(self.params)

    def store(self, row: int) -> None:
        self.rows[row] = [None if p.grad is None else p.grad.detach().clone() for p in self.params]
        for p in self.params:
            p.grad = None

    def flush_to_grads(self) -> None:
        for p, g in zip(self.params, self.total):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g
        self.total = [None] * len(self.params)


def _dot(a: list, b: list) -> float:
    return sum(float((x.float() * y.float()).sum().item()) for x, y in zip(a, b) if x is not None and y is not None)


def _axpy(alpha: float, x: list, y: list) -> list:
    """``alpha * x + y`` per parameter (None = zero)."""
    return [yi if xi is None else (alpha * xi if yi is None else alpha * xi + yi) for xi, yi in zip(x, y)]


def _proj(f: list, a: list) -> tuple[list, bool]:
    dot = _dot(f, a)
    if dot >= 0:
        return f, False
    return _axpy(-dot / max(_dot(a, a), 1e-20), a, f), True


def per_parameter_combine(bank: ParameterGrads, n: int, generator: torch.Generator, weights: Tensor,
                          agp: bool) -> dict[str, Tensor]:
    """METHOD section 5 with per-parameter loops (the reference's cost profile); adds the result to
    ``bank.total``. Returns norms / cos of the unweighted rows and the fired projections."""
    w = weights.tolist()
    grads = [[None if g is None else g * w[i] for g in bank.rows[i]] for i in range(n)]
    fired = torch.zeros(2, max(0, n - 1), dtype=torch.long)
    final = grads[0]
    if agp and n > 1:
        merged = {}
        for c in range(1, n):
            projected, fired[0, c - 1] = _proj(grads[c], grads[0])
            merged[c] = _axpy(1.0, projected, grads[0])
        order = (torch.randperm(n - 1, generator=generator) + 1).tolist()
        final = [None] * len(bank.params)
        for ci in order:
            u = merged[ci]
            for cj in order:
                if cj != ci:
                    u, hit = _proj(u, merged[cj])
                    fired[1, ci - 1] += int(hit)
            final = _axpy(1.0, u, final)
    elif n > 1:
        for c in range(1, n):
            final = _axpy(1.0, grads[c], final)
    bank.total = _axpy(1.0, final, bank.total)
    dots = [[_dot(bank.rows[i], bank.rows[j]) for j in range(n)] for i in range(n)]
    norms = [math.sqrt(max(dots[i][i], 0.0)) for i in range(n)]
    cos = [[dots[i][j] / max(norms[i] * norms[j], 1e-20) for j in range(n)] for i in range(n)]
    device = weights.device
    return {"norms": torch.tensor(norms, device=device), "cos": torch.tensor(cos, device=device),
            "fired": fired.to(device)}
