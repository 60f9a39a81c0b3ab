"""Asymmetric Gradient Projection (METHOD §5), evaluated on the Gram matrix of the term gradients.

Every vector AGP builds is a linear combination of the base gradients ``[g_ce, g_c1, ...]``, so
it is carried as a coefficient vector ``c`` over the bases and every dot product is
``c1^T G c2`` with ``G`` the n x n Gram matrix. One matmul gives ``G``; the AGP arithmetic is then
O(n^3) on the device without syncs; the result is applied as one linear combination of the bases.

``agp_reference`` is the direct definition on flat vectors (the test oracle);
``agp_coefficients`` is the Gram-space version; ``GradBank`` holds the per-term gradients of one
micro-step; ``agp_step`` wires them together.

Sharded parameters (FSDP2 DTensors, train_student.distributed): the bank holds each parameter's LOCAL
shard, its Gram matrix is the sum of the per-shard Grams over the ranks (the bank's ``reduce``), and
the coefficients, the same on every rank, are applied to the local rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

NORM_FLOOR = 1e-20  # |a|^2 floor of proj(f, a)


def _proj(f: Tensor, a: Tensor) -> Tensor:
    """``proj(f, a) = f - (f.a / |a|^2) a`` if ``f.a < 0`` else ``f``, for flat vectors ``[P]``."""
    dot = torch.dot(f, a)
    if dot < 0:
        return f - dot / torch.dot(a, a).clamp_min(NORM_FLOOR) * a
    return f


def agp_reference(g_ce: Tensor, g_terms: dict[str, Tensor], order: list[str]) -> Tensor:
    """AGP exactly as METHOD §5 on flat gradients (test oracle; use float64 for comparisons).

    Args:
        g_ce: ``[P]`` the (weighted) CE gradient, the anchor.
        g_terms: ``{term: [P]}`` the (weighted) gradients of the present distillation terms.
        order: the stage-2 order, a permutation of ``g_terms``' keys.

    Returns:
        ``[P]`` ``sum_c u_c``; just ``g_ce`` when no distillation term is present.
    """
    if sorted(order) != sorted(g_terms):
        raise ValueError(f"order {order} must be a permutation of the terms {sorted(g_terms)}")
    if not g_terms:
        return g_ce.clone()
    merged = {c: g_ce + _proj(g, g_ce) for c, g in g_terms.items()}
    projected = dict(merged)
    for ci in order:
        for cj in order:
            if cj != ci:
                projected[ci] = _proj(projected[ci], merged[cj])
    return torch.stack([projected[c] for c in order]).sum(dim=0)


def _proj_coeffs(f: Tensor, a: Tensor, gram: Tensor) -> tuple[Tensor, Tensor]:
    """``proj`` on coefficient vectors ``f, a: [..., n]``; returns the result and whether it fired."""
    dot = ((f @ gram) * a).sum(-1)
    sq = ((a @ gram) * a).sum(-1).clamp_min(NORM_FLOOR)
    fired = dot < 0
    scale = torch.where(fired, dot / sq, torch.zeros_like(dot))
    return f - scale.unsqueeze(-1) * a, fired


def agp_coefficients(gram: Tensor, order: Tensor) -> tuple[Tensor, Tensor]:
    """AGP in coefficient space: final gradient ``= coeffs @ bases``.

    Args:
        gram: ``[n, n]`` Gram matrix of the bases ``[g_ce, g_c1, ..., g_c(n-1)]`` (index 0 is the
            CE anchor; a zero row/column is a zero gradient).
        order: ``[n-1]`` long, the stage-2 order: a permutation of ``1..n-1``, on ``gram``'s device.

    Returns:
        coeffs: ``[n]`` in ``gram``'s dtype.
        fired: ``[2, n-1]`` long, per distillation term in base order (column j is base j+1):
            row 0 whether its stage-1 projection onto g_ce fired (0/1), row 1 how many of its
            stage-2 projections fired (0..n-2).
    """
    n = gram.shape[0]
    if gram.shape != (n, n) or order.shape != (n - 1,):
        raise ValueError(
            f"agp_coefficients needs gram [n, n] and order [n-1], got {tuple(gram.shape)} and "
            f"{tuple(order.shape)}"
        )
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
    followers, stage1 = _proj_coeffs(eye[1:], eye[0].expand(n - 1, n), gram)
    merged = (followers + eye[0]).index_select(0, order - 1)  # [n-1, n], rows in stage-2 order
    rows = list(merged.unbind(0))
    stage2 = [torch.zeros((), dtype=torch.long, device=gram.device) for _ in rows]
    for i in range(n - 1):
        for j in range(n - 1):
            if j != i:
                rows[i], fired = _proj_coeffs(rows[i], merged[j], gram)
                stage2[i] = stage2[i] + fired.long()
    coeffs = torch.stack(rows).sum(0) if rows else eye[0]
    stage2_base = torch.zeros(n - 1, dtype=torch.long, device=gram.device)
    if rows:
        stage2_base = stage2_base.index_copy(0, order - 1, torch.stack(stage2))
    return coeffs, torch.stack([stage1.long(), stage2_base])


def local(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class GradBank:
    """Flat per-term gradient rows of one micro-step plus the window's combined gradient.

    Memory: ``max_terms * P * bytes(dtype)`` for the rows plus ``P * 4`` for the float32 window
    total, P = number of trainable parameter elements (of the local shards, for sharded parameters).
    ``reduce``: in-place sum over the ranks of a Gram matrix of local shards (sharded parameters);
    None when the rows are whole gradients.

    Usage per micro-step: for each term, backward its loss then ``store(row)`` (row 0 = CE);
    ``combine(coeffs, n)`` adds ``coeffs @ rows[:n]`` to the window total. Before the optimizer
    step, ``flush_to_grads()`` adds the total into the parameters' ``.grad``. The total stays out
    of ``.grad`` until then, so later backward passes of the window capture only their own term.
    """

    def __init__(self, params: Iterable[nn.Parameter], max_terms: int, *, dtype=torch.float32,
                 reduce: Callable[[Tensor], None] | None = None):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("GradBank got no parameters with requires_grad=True")
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"GradBank dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        if max_terms < 1:
            raise ValueError(f"max_terms must be >= 1, got {max_terms}")
        devices = {p.device for p in self.params}
        if len(devices) != 1:
            raise ValueError(f"GradBank needs all parameters on one device, found {devices}")
        self.reduce = reduce
        self.offsets = []
        total = 0
        for p in self.params:
            self.offsets.append(total)
            total += local(p).numel()
        device = devices.pop()
        self.buffer = torch.zeros(max_terms, total, dtype=dtype, device=device)
        self.total = torch.zeros(total, dtype=torch.float32, device=device)

    def _check_rows(self, n: int) -> None:
        if not 1 <= n <= self.buffer.shape[0]:
            raise ValueError(f"row count/index must be within 1..{self.buffer.shape[0]}, got {n}")

    def store(self, row: int) -> None:
        """Copy every parameter's ``.grad`` (None -> zeros) into ``row`` and reset ``.grad`` to None."""
        self._check_rows(row + 1)
        for p, off in zip(self.params, self.offsets):
            dst = self.buffer[row, off : off + local(p).numel()]
            if p.grad is None:
                dst.zero_()
            else:
                dst.copy_(local(p.grad).reshape(-1))
            p.grad = None

    def gram(self, n: int) -> Tensor:
        """``[n, n]`` float32 Gram matrix of rows ``0..n-1`` (one matmul; bf16 rows give a bf16
        product, rounded to about 3 significant digits per entry); summed over the ranks with ``reduce``."""
        self._check_rows(n)
        rows = self.buffer[:n]
        gram = (rows @ rows.T).float()
        if self.reduce is not None:
            self.reduce(gram)
        return gram

    def norms(self, n: int) -> Tensor:
        """``[n]`` float32 L2 norms of rows ``0..n-1`` (the square root of the Gram diagonal)."""
        self._check_rows(n)
        if self.reduce is not None:
            return self.gram(n).diagonal().clamp_min(0).sqrt()
        return torch.linalg.vector_norm(self.buffer[:n], dim=1, dtype=torch.float32)

    def combine(self, coeffs: Tensor, n: int) -> None:
        """Add ``coeffs @ rows[:n]`` (``coeffs: [n]`` float32, on the bank's device) to the window
        total, accumulating in float32."""
        self._check_rows(n)
        if coeffs.shape != (n,):
            raise ValueError(f"coeffs must have shape ({n},), got {tuple(coeffs.shape)}")
        coeffs = coeffs.float()
        for i in range(n):
            self.total.addcmul_(self.buffer[i], coeffs[i])

    def flush_to_grads(self) -> None:
        """Add the window total into each parameter's ``.grad`` (allocated if None), zero the total."""
        for p, off in zip(self.params, self.offsets):
            shard = local(p)
            g = self.total[off : off + shard.numel()].view_as(shard)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            local(p.grad).add_(g)
        self.total.zero_()


def agp_step(
    bank: GradBank,
    n: int,
    order_generator: torch.Generator,
    *,
    weights: Tensor | None = None,
) -> dict[str, Tensor]:
    """AGP for one micro-step: rows ``0..n-1`` of ``bank`` hold ``[g_ce, g_c1, ...]``.

    Draws the stage-2 order with ``torch.randperm(n-1, generator=order_generator)`` (a CPU
    generator), runs ``agp_coefficients`` on the Gram matrix and adds the result to the bank's
    window total (``GradBank.combine``). No host sync.

    Args:
        weights: optional ``[n]`` float32 term weights on the bank's device. When given, the rows
            hold UNWEIGHTED gradients and AGP runs on ``weights[i] * row_i`` (Gram ``W G W``);
            when None the rows are already weighted.

    Returns:
        tensors: ``order`` ``[n-1]`` (CPU), ``coeffs`` ``[n]`` over the stored rows,
        ``fired`` ``[2, n-1]`` (see ``agp_coefficients``), ``cos`` ``[n, n]`` cosines between the
        stored rows (0 where a row is zero), ``norms`` ``[n]`` norms of the stored rows.
    """
    order = torch.randperm(n - 1, generator=order_generator) + 1
    gram = bank.gram(n)
    norms = gram.diagonal().clamp_min(0).sqrt()
    scale = torch.ones_like(norms) if weights is None else weights.float()
    coeffs, fired = agp_coefficients(gram * scale[:, None] * scale[None, :], order.to(gram.device))
    coeffs = coeffs * scale
    bank.combine(coeffs, n)
    cos = gram / (norms[:, None] * norms[None, :]).clamp_min(NORM_FLOOR)
    return {"order": order, "coeffs": coeffs, "fired": fired, "cos": cos, "norms": norms}
