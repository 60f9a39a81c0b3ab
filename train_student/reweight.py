"""Online loss reweighting (METHOD §6).

One learnable ``a_k`` per term with a positive static weight, in the fixed order ``ce, p, r, d``;
``w_k = clamp(softplus(a_k) + 1e-8, 1e-6, 1e6)`` and ``w_ce >= ce_floor``. Over an accumulation
window ``observe`` collects each term's raw loss and the norm of its unweighted gradient; ``step``
(once per optimizer step) moves the weights so that each term's share of the weighted gradient
norm approaches its static share, with one AdamW step on ``a`` followed by a renormalisation.

As in the reference trainer, a window mean divides a term's sum by the number of micro-steps in
the window (also those where the term was absent), and only the loss ratios are constants in the
objective: ``Gs = sum G_k`` keeps its dependence on the weights.

All state lives on one device as tensors and ``step`` is free of host syncs: terms absent from the
window, and windows where fewer than two terms were present or every gradient norm was 0, are left
untouched through masks (AdamW state included), as the reference trainer skips them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from schemas.method import LOSS_TERMS

W_EPS, W_MIN, W_MAX = 1e-8, 1e-6, 1e6
ADAM_EPS = 1e-8
LOSS0_FLOOR = 1e-12
_STATE_KEYS = (
    "a", "exp_avg", "exp_avg_sq", "steps", "loss0", "has_loss0", "loss_sum", "norm_sum", "count",
    "micro_steps",
)


def _inverse_softplus(w: Tensor) -> Tensor:
    """``a`` with ``softplus(a) = w`` for ``w > 0`` (expm1 floored at 1e-20); above 20 the equivalent
    ``w + log(-expm1(-w))``, as expm1 overflows float32 beyond ~88 (a static weight of 100 became inf)."""
    large = w > 20
    return torch.where(large, w + torch.log(-torch.expm1(-w.clamp_min(20))),
                       torch.log(torch.expm1(w.clamp_max(20)).clamp_min(1e-20)))


class LossReweighter:
    """Online reweighting of the loss terms (METHOD §6).

    Args:
        static: ``{term: weight}`` with terms among ``ce, p, r, d``; terms with weight 0 are
            dropped, the others get one ``a_k`` initialised so that ``w_k`` equals the static
            weight (up to the clamps and the CE floor).
        alpha: exponent of the loss-ratio correction of the targets (0 = off).
        lr, betas: AdamW hyper-parameters for ``a`` (weight decay 0, eps 1e-8).
        ce_floor: lower bound of ``w_ce``.
        device: where the state lives (that of the losses and norms passed to ``observe``).
        shares: ``{term: share}`` of the weighted gradient norm each term is steered towards
            (normalised over the present terms); None: the static weights (METHOD §6). With
            ``loss.scale=balanced`` the observed norms are those of the calibrated units and the
            shares ``{ce: 1, c: balance_ratio[c]}``, the calibration's own target (``set_shares``).
    """

    def __init__(
        self,
        static: dict[str, float],
        *,
        alpha: float = 0.0,
        lr: float = 3e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        ce_floor: float = 0.6,
        device: torch.device | str = "cpu",
        shares: dict[str, float] | None = None,
    ):
        problems = []
        unknown = sorted(set(static) - set(LOSS_TERMS))
        if unknown:
            problems.append(f"unknown terms {unknown}; terms are {list(LOSS_TERMS)}")
        bad = {k: v for k, v in static.items() if not (math.isfinite(v) and v >= 0)}
        if bad:
            problems.append(f"static weights must be finite and >= 0, got {bad}")
        if not any(v > 0 for v in static.values()):
            problems.append(f"at least one static weight must be > 0, got {static}")
        if not (math.isfinite(alpha) and lr > 0 and 0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            problems.append(
                f"need a finite alpha, lr > 0 and betas in [0, 1); got {alpha}, {lr}, {betas}"
            )
        if ce_floor < 0:
            problems.append(f"ce_floor must be >= 0, got {ce_floor}")
        if problems:
            raise ValueError("invalid LossReweighter settings: " + "; ".join(problems))
        self.terms = [t for t in LOSS_TERMS if static.get(t, 0.0) > 0]
        self.alpha, self.lr, self.betas, self.ce_floor = float(alpha), float(lr), betas, ce_floor
        self.device = torch.device(device)
        k = len(self.terms)
        self.static = torch.tensor([static[t] for t in self.terms], device=self.device)
        self.is_ce = torch.tensor([t == "ce" for t in self.terms], device=self.device)
        zeros = torch.zeros(k, device=self.device)
        self.shares = self.static if shares is None else self._vector(shares, "shares")
        self.state = {
            "a": _inverse_softplus(self.static.clamp(W_MIN, W_MAX)),
            "exp_avg": zeros.clone(),
            "exp_avg_sq": zeros.clone(),
            "steps": zeros.clone(),
            "loss0": zeros.clone(),
            "has_loss0": torch.zeros(k, dtype=torch.bool, device=self.device),
            "loss_sum": zeros.clone(),
            "norm_sum": zeros.clone(),
            "count": zeros.clone(),
            "micro_steps": torch.zeros((), device=self.device),
        }

    def _vector(self, values: dict[str, float], what: str) -> Tensor:
        if set(values) != set(self.terms) or not all(math.isfinite(v) and v > 0 for v in values.values()):
            raise ValueError(f"{what} must give a finite value > 0 for each of the terms {self.terms}, got {values}")
        return torch.tensor([float(values[t]) for t in self.terms], device=self.device)

    def set_shares(self, shares: dict[str, float]) -> None:
        """New target shares (``loss.scale=balanced``: ``{ce: 1, t: balance_ratio}``, once calibrated)."""
        self.shares = self._vector(shares, "shares")

    def _weight_vector(self, a: Tensor) -> Tensor:
        """``[K]`` weights from ``a: [K]``: clamp(softplus(a) + 1e-8, 1e-6, 1e6), CE floored."""
        w = (F.softplus(a) + W_EPS).clamp(W_MIN, W_MAX)
        return torch.where(self.is_ce, w.clamp_min(self.ce_floor), w)

    def weights(self) -> dict[str, Tensor]:
        """Current weights, ``{term: 0-d float32 tensor}`` (detached)."""
        w = self._weight_vector(self.state["a"])
        return {t: w[i] for i, t in enumerate(self.terms)}

    def observe(self, losses: dict[str, Tensor], grad_norms: dict[str, Tensor]) -> None:
        """Add one micro-step's raw losses ``L_k`` and UNWEIGHTED gradient norms ``n_k`` (0-d
        tensors, same keys: the terms present in this micro-step) to the window."""
        if set(losses) != set(grad_norms) or not set(losses) <= set(self.terms):
            raise ValueError(
                f"observe needs the same keys for losses and norms, among {self.terms}; got "
                f"{sorted(losses)} and {sorted(grad_norms)}"
            )
        keys = sorted(losses, key=self.terms.index)
        index = torch.tensor([self.terms.index(k) for k in keys], device=self.device)
        st = self.state
        for name, values in (("loss_sum", losses), ("norm_sum", grad_norms)):
            vec = torch.stack([values[k].detach().float().to(self.device) for k in keys])
            st[name].index_add_(0, index, vec)
        st["count"].index_add_(0, index, torch.ones(len(keys), device=self.device))
        st["micro_steps"] += 1

    def sum_window(self, reduce) -> None:
        """Sum the window's statistics (losses, norms, counts, micro-steps) over the data-parallel ranks with
        ``reduce`` (an in-place all-reduce, one collective) before ``step``, so every rank holds the whole
        window's statistics and takes the same step."""
        st, k = self.state, len(self.terms)
        flat = torch.cat([st["loss_sum"], st["norm_sum"], st["count"], st["micro_steps"][None]])
        reduce(flat)
        st["loss_sum"], st["norm_sum"], st["count"] = flat[:k], flat[k:2 * k], flat[2 * k:3 * k]
        st["micro_steps"] = flat[3 * k]

    def _objective_grad(
        self, present: Tensor, mean_loss: Tensor, mean_norm: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Gradient of ``sum_k |G_k - target_k|`` w.r.t. ``a`` (``Gs`` in the targets not
        detached; loss ratios constant) and ``Gs``."""
        a = self.state["a"].detach().requires_grad_(True)
        zeros = torch.zeros_like(mean_norm)
        big_g = torch.where(present, self._weight_vector(a) * mean_norm, zeros)
        g_sum = big_g.sum()
        shares = torch.where(present, self.shares, torch.zeros_like(self.shares))
        target = shares / shares.sum().clamp_min(W_MIN) * g_sum
        if self.alpha != 0.0:
            ratio = mean_loss / self.state["loss0"].clamp_min(LOSS0_FLOOR)
            ratio = torch.where(present, ratio, torch.zeros_like(ratio))
            r_bar = (ratio.sum() / present.sum().clamp_min(1)).clamp_min(LOSS0_FLOOR)
            target = target * (ratio / r_bar).pow(self.alpha)
        objective = torch.where(present, (big_g - target).abs(), zeros).sum()
        (grad,) = torch.autograd.grad(objective, a)
        return grad, g_sum.detach()

    def _adamw(self, grad: Tensor, update: Tensor) -> Tensor:
        """One AdamW step (weight decay 0) on the masked entries of ``a``; returns the new ``a``."""
        st, (beta1, beta2) = self.state, self.betas
        steps = st["steps"] + update.float()
        exp_avg = torch.where(update, st["exp_avg"].lerp(grad, 1 - beta1), st["exp_avg"])
        exp_avg_sq = torch.where(
            update, st["exp_avg_sq"] * beta2 + (1 - beta2) * grad * grad, st["exp_avg_sq"]
        )
        safe_steps = steps.double().clamp_min(1)
        step_size = (self.lr / (1 - beta1**safe_steps)).float()
        bias2_sqrt = (1 - beta2**safe_steps).sqrt().float()
        a_new = st["a"] - step_size * (exp_avg / (exp_avg_sq.sqrt() / bias2_sqrt + ADAM_EPS))
        st["steps"], st["exp_avg"], st["exp_avg_sq"] = steps, exp_avg, exp_avg_sq
        return torch.where(update, a_new, st["a"])

    def step(self) -> dict[str, Tensor]:
        """Update the weights from the window's means and start a new window (once per optimizer
        step). Returns the new weights (see ``weights``)."""
        st = self.state
        present = st["count"] > 0
        micro_steps = st["micro_steps"].clamp_min(1)
        mean_loss = st["loss_sum"] / micro_steps
        mean_norm = st["norm_sum"] / micro_steps
        enough = present & (present.sum() >= 2)
        first = enough & ~st["has_loss0"]
        st["loss0"] = torch.where(first, mean_loss, st["loss0"])
        st["has_loss0"] = st["has_loss0"] | first
        grad, g_sum = self._objective_grad(present, mean_loss, mean_norm)
        update = enough & (g_sum > 0)
        w = self._weight_vector(self._adamw(grad, update))
        static = torch.where(update, self.static, torch.zeros_like(self.static))
        subset = torch.where(update, w, torch.zeros_like(w)).sum().clamp_min(1e-20)
        w = (w * static.sum() / subset).clamp(W_MIN, W_MAX)
        w = torch.where(self.is_ce, w.clamp_min(self.ce_floor), w)
        st["a"] = torch.where(update, _inverse_softplus(w), st["a"])
        for key in ("loss_sum", "norm_sum", "count", "micro_steps"):
            st[key] = torch.zeros_like(st[key])
        return self.weights()

    def state_dict(self) -> dict:
        """Everything needed for an exact resume (cloned tensors plus the term list)."""
        return {"terms": list(self.terms), **{k: v.clone() for k, v in self.state.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()`` output; the term list must match this reweighter's."""
        if state.get("terms") != self.terms:
            raise ValueError(
                f"reweighter state is for terms {state.get('terms')}, this run has {self.terms}; "
                "use the same static weights as the checkpointed run"
            )
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"reweighter state lacks {missing}")
        self.state = {k: state[k].clone().to(self.device) for k in _STATE_KEYS}
