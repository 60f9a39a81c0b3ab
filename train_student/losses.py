"""Attention-distillation losses of Drive-KD (METHOD §3).

All maps are head-averaged attention maps with rows = queries. Every loss is computed in float32
(inputs of other dtypes are cast, differentiably), and gradients flow into the student tensors.

Perception (layer 0) and planning (layer L-2) compare only the text-to-vision block
``M_tv[i, j] = t[i] and v[j]`` (cut out by ``pipeline.attention_maps.tv_block``); ``masked_tv_mse``
is the masked MSE on it. Reasoning compares full S x S maps of the intermediate layers, each student
layer against the mean of a group of teacher layers (``pipeline.attention_maps.group_layers`` /
``group_mean``) with ``reasoning_mse``. These MSEs over probabilities are the reference (``loss.kind=mse``);
their gradients are ~1e-7 of CE's (METHOD §9). ``row_kl`` and ``row_cosine`` (``loss.kind=kl | cosine``)
compare each query row as a distribution / direction instead, with gradients of order one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def masked_tv_mse(student_block: Tensor, teacher_block: Tensor) -> Tensor:
    """Perception / planning loss on text-to-vision blocks.

    ``sum((s - t)^2) / max(1, n_text * n_vision)``, which equals METHOD's
    ``sum(M_tv * (A_s - A_t)^2) / max(1, sum(M_tv))`` on the full maps. Leading dimensions, if any,
    are averaged.

    Args:
        student_block: ``[..., n_text, n_vision]`` (gradients flow into it).
        teacher_block: same shape.

    Returns:
        scalar float32; 0 when the block is empty (no text or no vision positions).
    """
    if student_block.shape != teacher_block.shape or student_block.dim() < 2:
        raise ValueError(
            f"student and teacher blocks must share a [..., n_text, n_vision] shape, got "
            f"{tuple(student_block.shape)} and {tuple(teacher_block.shape)}"
        )
    n_text, n_vision = student_block.shape[-2:]
    n_maps = math.prod(student_block.shape[:-2])
    sq = (student_block.float() - teacher_block.float()).square().sum()
    return sq / max(1, n_text * n_vision * n_maps)


def reasoning_mse(student_maps: Tensor, targets: Tensor) -> Tensor:
    """Reasoning loss: mean over the k student layers of the mean over all S*S entries.

    Args:
        student_maps: ``[k, S, S]`` intermediate student maps (gradients flow into them).
        targets: ``[k, S, S]`` group means of the teacher maps (``group_mean``).

    Returns:
        scalar float32. Entries above the diagonal (zero in causal maps) count in the mean.
    """
    if student_maps.shape != targets.shape or student_maps.dim() != 3:
        raise ValueError(
            f"student maps and targets must both be [k, S, S], got {tuple(student_maps.shape)} "
            f"and {tuple(targets.shape)}"
        )
    return (student_maps.float() - targets.float()).square().mean()




# ---------------------------------------------------------------- per-row kinds (loss.kind = kl | cosine)
ROW_EPS = 1e-8
"""Rows whose teacher mass (kl) or norm (cosine) is at most ROW_EPS are left out of the mean; the same
value floors the student's row sums/norms and the logs' arguments."""


def _check_rows(student: Tensor, teacher: Tensor) -> None:
    if student.shape != teacher.shape or student.dim() < 2:
        raise ValueError(f"student and teacher maps must share a [..., rows, columns] shape, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")


def _mean_over_valid(per_row: Tensor, valid: Tensor) -> Tensor:
    return torch.where(valid, per_row, torch.zeros_like(per_row)).sum() / valid.sum().clamp_min(1)


def row_kl(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean per-row ``KL(teacher_row || student_row)`` of row-renormalised maps (MiniLM-style).

    Each row is renormalised over its columns: over the text-to-vision block for perception /
    planning (``[n_text, n_vision]``), over the causal row for reasoning (``[k, S, S]``: the zeros above
    the diagonal add no mass). ``p = t / sum(t)``, ``q = s / max(sum(s), ROW_EPS)``,
    ``KL = sum_j p_j * (log(p_j + ROW_EPS) - log(q_j + ROW_EPS))``. Teacher values are clamped at 0
    (quantised caches). Rows where the teacher puts at most ROW_EPS mass on the block (text before
    the first image, in a causal map) have no distribution to match and are left out.

    Args:
        student: ``[..., R, C]`` student maps (gradients flow into them).
        teacher: same shape.

    Returns:
        scalar float32: the mean over the valid rows of all leading dimensions; 0 if none.
    """
    _check_rows(student, teacher)
    s, t = student.float(), teacher.float().clamp_min(0)
    t_sum = t.sum(-1, keepdim=True)
    valid = t_sum.squeeze(-1) > ROW_EPS
    p = t / t_sum.clamp_min(ROW_EPS)
    q = s / s.sum(-1, keepdim=True).clamp_min(ROW_EPS)
    per_row = (p * ((p + ROW_EPS).log() - (q + ROW_EPS).log())).sum(-1)
    return _mean_over_valid(per_row, valid)


def row_cosine(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean per-row cosine distance ``1 - s.t / (|s| |t|)`` (the paper's cosine ablation, per query row).

    Scale-free, so no renormalisation; rows whose teacher norm is at most ROW_EPS are left out and
    the student's norm is floored at ROW_EPS.

    Args:
        student: ``[..., R, C]`` (gradients flow into it).
        teacher: same shape.

    Returns:
        scalar float32 in [0, 2]: the mean over the valid rows; 0 if none.
    """
    _check_rows(student, teacher)
    s, t = student.float(), teacher.float()
    t_norm = torch.linalg.vector_norm(t, dim=-1)
    valid = t_norm > ROW_EPS
    cos = (s * t).sum(-1) / (torch.linalg.vector_norm(s, dim=-1).clamp_min(ROW_EPS) * t_norm.clamp_min(ROW_EPS))
    return _mean_over_valid(1.0 - cos, valid)


LOSS_KINDS = ("mse", "kl", "cosine")


def attention_losses(kind: str) -> tuple[Callable[[Tensor, Tensor], Tensor], Callable[[Tensor, Tensor], Tensor]]:
    """``(text-to-vision block loss, reasoning maps loss)`` of ``loss.kind``: mse is METHOD §3
    (``masked_tv_mse``, ``reasoning_mse``); kl and cosine apply ``row_kl`` / ``row_cosine`` to both."""
    if kind not in LOSS_KINDS:
        raise ValueError(f"loss kind {kind!r}: choose from {LOSS_KINDS}")
    if kind == "mse":
        return masked_tv_mse, reasoning_mse
    row = row_kl if kind == "kl" else row_cosine
    return row, row
