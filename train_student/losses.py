"""Attention-distillation losses of Drive-KD (METHOD §3).

All maps are head-averaged attention maps with rows = queries. Every loss is computed in float32
(inputs of other dtypes are cast, differentiably), and gradients flow into the student tensors.

Perception (layer 0) and planning (layer L-2) compare only the text-to-vision block
``M_tv[i, j] = t[i] and v[j]``; ``tv_block`` cuts that block out and ``masked_tv_mse`` is the masked
MSE on it. Reasoning compares full S x S maps of the intermediate layers, each student layer against
the mean of a group of teacher layers (``resolve_layer_range`` -> ``group_layers`` / ``group_mean``
-> ``reasoning_mse``). The teacher cache stores intermediate maps as their lower triangle
(``dense_to_tril`` / ``tril_to_dense``): causal maps are zero above the diagonal.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def resolve_layer_range(start: int, end: int, num_layers: int) -> list[int]:
    """Inclusive layer range ``start..end``; negative values count from ``num_layers``.

    The default intermediate range ``start=0, end=-2`` gives ``[0, ..., num_layers - 2]``.

    Raises:
        ValueError: ``num_layers < 1``, an index outside ``[0, num_layers)`` after resolution, or
            ``start`` resolving after ``end`` (empty range).
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    resolved = []
    for name, spec in (("start", start), ("end", end)):
        idx = spec if spec >= 0 else num_layers + spec
        if not 0 <= idx < num_layers:
            raise ValueError(
                f"layer {name}={spec} resolves to {idx}, outside [0, {num_layers}) for a model "
                f"with {num_layers} layers; use a value in [{-num_layers}, {num_layers - 1}]"
            )
        resolved.append(idx)
    lo, hi = resolved
    if lo > hi:
        raise ValueError(
            f"empty layer range: start={start} resolves to {lo} > end={end} resolves to {hi} "
            f"(num_layers={num_layers}); the range is inclusive and needs start <= end"
        )
    return list(range(lo, hi + 1))


def _group_starts(k: int, m: int) -> tuple[int, list[int]]:
    """Group size ``g = max(1, m-k+1)`` and the start ``o_i = min(i, m-g)`` of each student layer i."""
    if k < 1 or m < 1:
        raise ValueError(
            f"layer grouping needs at least one student and one teacher layer, got {k} student "
            f"and {m} teacher layers; check the intermediate start/end options"
        )
    g = max(1, m - k + 1)
    return g, [min(i, m - g) for i in range(k)]


def group_layers(num_student: int, teacher_layers: list[int]) -> list[list[int]]:
    """Teacher layers matched with each of the ``num_student`` student layers (METHOD §3).

    With ``k = num_student`` and ``m = len(teacher_layers)``: group size ``g = max(1, m-k+1)``; the
    i-th student layer gets ``teacher_layers[o : o+g]`` with ``o = min(i, m-g)``. When ``m < k``,
    ``g = 1`` and the last student layers all share the last teacher layer.

    Returns:
        ``k`` lists of ``g`` teacher layer ids each.
    """
    g, starts = _group_starts(num_student, len(teacher_layers))
    return [list(teacher_layers[o : o + g]) for o in starts]


def group_mean(teacher_maps: Tensor, k: int) -> Tensor:
    """Reasoning targets: mean of each student layer's teacher group.

    Args:
        teacher_maps: ``[m, ...]`` the teacher maps of the m intermediate teacher layers, stacked
            in layer order (any trailing shape, e.g. ``[S, S]`` or a packed lower triangle).
        k: number of intermediate student layers.

    Returns:
        ``[k, ...]`` float32; entry i is the mean of ``teacher_maps[o_i : o_i+g]`` (see
        ``group_layers``).
    """
    g, starts = _group_starts(k, teacher_maps.shape[0])
    windows = teacher_maps.float().unfold(0, g, 1)  # [m-g+1, ..., g], a view
    index = torch.tensor(starts, device=teacher_maps.device)
    return windows.index_select(0, index).mean(dim=-1)


def tv_block(attn: Tensor, is_vision: Tensor) -> Tensor:
    """Text-to-vision block of attention maps.

    Args:
        attn: ``[..., S, S]`` maps, rows = queries.
        is_vision: ``[S]`` bool, True at image-token positions. Keeping it on the CPU avoids a
            device sync (the positions are looked up with ``nonzero``).

    Returns:
        ``[..., n_text, n_vision]`` with rows at text positions and columns at vision positions,
        both in sequence order.
    """
    size = attn.shape[-1]
    if attn.dim() < 2 or attn.shape[-2] != size or is_vision.shape != (size,):
        raise ValueError(
            f"tv_block needs attn [..., S, S] and is_vision [S]; got attn {tuple(attn.shape)} "
            f"and is_vision {tuple(is_vision.shape)}"
        )
    vision = is_vision.bool()
    rows = torch.nonzero(~vision).flatten().to(attn.device)
    cols = torch.nonzero(vision).flatten().to(attn.device)
    return attn.index_select(-2, rows).index_select(-1, cols)


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


def _tril_flat_index(size: int, device: torch.device) -> Tensor:
    """``[S*(S+1)/2]`` flat positions ``i*S + j`` of the lower triangle, row-major (j = 0..i)."""
    rows, cols = torch.tril_indices(size, size, device=device)
    return rows * size + cols


def dense_to_tril(dense: Tensor) -> Tensor:
    """Pack the lower triangle (diagonal included) of ``[..., S, S]`` into ``[..., S*(S+1)/2]``.

    Row-major: row i contributes entries ``j = 0..i`` in order.
    """
    size = dense.shape[-1]
    if dense.dim() < 2 or dense.shape[-2] != size:
        raise ValueError(f"dense_to_tril needs [..., S, S], got {tuple(dense.shape)}")
    flat = dense.reshape(*dense.shape[:-2], size * size)
    return flat.index_select(-1, _tril_flat_index(size, dense.device))


def tril_to_dense(packed: Tensor, size: int) -> Tensor:
    """Inverse of ``dense_to_tril``: ``[..., S*(S+1)/2]`` -> ``[..., S, S]``, zeros above the diagonal."""
    n_packed = size * (size + 1) // 2
    if packed.dim() < 1 or packed.shape[-1] != n_packed:
        raise ValueError(
            f"a packed lower triangle of a {size}x{size} map has {n_packed} entries, got "
            f"shape {tuple(packed.shape)}"
        )
    lead = packed.shape[:-1]
    dense = packed.new_zeros(*lead, size * size)
    dense.index_copy_(-1, _tril_flat_index(size, packed.device), packed)
    return dense.reshape(*lead, size, size)
