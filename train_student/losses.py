"""Attention-distillation losses of Drive-KD (METHOD §3).

All maps are head-averaged attention maps with rows = queries. Every loss is computed in float32
(inputs of other dtypes are cast, differentiably), and gradients flow into the student tensors.

Perception (layer 0) and planning (layer L-2) compare only the text-to-vision block
``M_tv[i, j] = t[i] and v[j]`` (cut out by ``pipeline.attention_maps.tv_block``); ``masked_tv_mse``
is the masked MSE on it. Reasoning compares full S x S maps of the intermediate layers, each student
layer against the mean of a group of teacher layers (``pipeline.attention_maps.group_layers`` /
``group_mean``) with ``reasoning_mse``.
"""

from __future__ import annotations

import math

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


