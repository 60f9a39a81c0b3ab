"""Attention-map geometry shared by the teacher cache and the student trainer (METHOD section 3).

The intermediate layer-group matching (over ranges that ``schemas.method.LayerPlan`` resolves), the
text-to-vision block, and the packed lower triangle in which causal maps are stored. All functions work on torch tensors on any device.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
