"""The distillation terms' scale (METHOD §9): balanced calibration and the inert-term warning.

At the reference scale (``loss.scale=reference``, lambda = 1, MSE over probabilities) the attention
terms' gradients are ~1e-7 of CE's. ``loss.scale=balanced`` calibrates each distillation lambda once,
on the first window of a fresh run (the ``grad_accum`` samples of the first optimizer step, before
that step is trained on them), so that

    lam_t * mean |grad L_t| = balance_ratio[role of t] * lam_ce * mean |grad L_ce|

(means over the window's samples where the term is present; ``balanced_lambdas``). The window's
per-term gradients are taken with ``torch.autograd.grad`` (one term at a time, nothing accumulated
into ``.grad``), so calibration works in every mode, the plain one included. The calibration record
(``calibrate``) is stored in every checkpoint's meta and in the first metrics row; a resume applies
it again instead of recalibrating (``apply_calibration``), so a resumed run equals an uninterrupted one.

The calibration is applied as per-term units (calibrated lambda / configured lambda) that multiply
the static or learned weights (``TermWeights.set_units``), so the run starts at the calibrated lambdas.
With reweighting, the reweighter keeps its reference parametrisation around the configured weights
(~1, where its AdamW steps of ~3e-4 and its clamps [1e-6, 1e6] mean what they mean in METHOD §6) and
learns a factor on the calibrated units: it observes the unit-scaled gradient norms, and its target
shares are ``{ce: 1, t: balance_ratio}``, so the calibrated point is where its objective starts
(``LossReweighter.set_shares``). Making the calibrated lambdas its static weights instead would clamp
MSE lambdas (~1e7 at the demo scale) at 1e6 and freeze them (a step of 3e-4 on 1e6).

``InertTerms`` warns once per term when a distillation term's lambda-weighted gradient is below
``INERT_RATIO`` of CE's over an optimizer step's window.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import torch
from torch import Tensor

from schemas.method import TERM_ROLE

INERT_RATIO = 1e-3
"""A distillation term whose weighted gradient norm is below this fraction of CE's is reported inert."""


def balanced_lambdas(norms: dict[str, float], ratios: dict[str, float], lam_ce: float) -> dict[str, float]:
    """Lambdas with ``lam_t * norms[t] = ratios[t] * lam_ce * norms["ce"]`` for every distillation term.

    Args:
        norms: ``{term: mean unweighted gradient norm}``, ``ce`` included.
        ratios: ``{term: target ratio}`` for the distillation terms of ``norms``.
        lam_ce: the CE lambda (kept).

    Returns:
        ``{"ce": lam_ce, t: lam_t}``. Raises ValueError naming a term whose gradient is 0.
    """
    zero = [t for t, n in norms.items() if not n > 0]
    if zero:
        raise ValueError(f"cannot calibrate loss.scale=balanced: the gradient norm of term(s) {zero} is "
                         f"{[norms[t] for t in zero]} over the first window (a teacher map equal to the "
                         "student's, or every parameter it reaches frozen?); use --set loss.scale=reference")
    return {"ce": lam_ce, **{t: ratios[t] * lam_ce * norms["ce"] / n for t, n in norms.items() if t != "ce"}}


def term_grad_norms(losses: dict[str, Tensor], params: list[Tensor]) -> dict[str, Tensor]:
    """``{term: 0-d |grad loss|}`` over ``params``, one ``autograd.grad`` per term (``.grad`` untouched)."""
    norms, terms = {}, list(losses)
    for i, term in enumerate(terms):
        grads = torch.autograd.grad(losses[term], params, retain_graph=i < len(terms) - 1, allow_unused=True)
        parts = [torch.linalg.vector_norm(g.float()) for g in grads if g is not None]
        norms[term] = torch.linalg.vector_norm(torch.stack(parts)) if parts else losses[term].new_zeros(())
    return norms


def first_window(items: Iterable, size: int) -> list:
    """The first ``size`` trained (not skipped) items of a stream: the samples of the first optimizer
    step (fewer when the epoch is shorter)."""
    window = []
    for item in items:
        if not item.skipped:
            window.append(item)
            if len(window) == size:
                break
    return window


def calibrate(forward, weights, params: list[Tensor], items: list, loss_config, *, grad_norms=term_grad_norms,
              reduce=None) -> dict:
    """Measure the window's mean per-term gradient norms and compute the balanced lambdas.

    Args:
        forward: ``(item, distillation terms) -> {term: loss}`` (a ``CapturedForward``).
        weights: the run's ``TermWeights`` (which terms each capability's samples carry).
        params: the trainable parameters.
        items: the first window (``first_window``); with ``reduce``, this rank's part of it.
        loss_config: ``LossConfig`` (``lam_ce``, ``balance_ratio``).
        grad_norms: ``(losses, params) -> {term: 0-d norm}`` of one sample (``term_grad_norms``; sharded
            parameters: ``train_student.distributed.sharded_grad_norms``).
        reduce: in-place sum over the data-parallel ranks of a tensor (train_student.distributed), so that
            the means are over the whole window; None in one process.

    Returns:
        the calibration record ``{"lambdas", "grad_norms", "ratios", "samples"}`` (plain floats), as
        stored in checkpoints; apply it with ``apply_calibration``.
    """
    per_term: dict[str, list[Tensor]] = {t: [] for t in weights.static}
    for item in items:
        present = weights.for_sample(item.capability)[0]
        for term, norm in grad_norms(forward(item, present[1:]), params).items():
            per_term[term].append(norm.detach())
    zero = torch.zeros((), device=weights.device)
    sums = torch.stack([torch.stack(values).sum() if values else zero for values in per_term.values()])
    counts = torch.tensor([*(len(values) for values in per_term.values()), len(items)], dtype=sums.dtype,
                          device=sums.device)
    totals = torch.cat([sums, counts])
    if reduce is not None:
        reduce(totals)
    values = totals.tolist()  # the one sync
    k = len(per_term)
    samples = int(values[-1])
    if not samples:
        raise ValueError("cannot calibrate loss.scale=balanced: the first epoch has no trainable sample")
    absent = [t for t, count in zip(per_term, values[k:2 * k]) if not count]
    if absent:
        raise ValueError(f"cannot calibrate loss.scale=balanced: term(s) {absent} are in no sample of the first "
                         f"window ({samples} samples; loss.mix gives them weight 0 there): raise optim.grad_accum "
                         "or give them weight in loss.mix")
    norms = {t: total / count for t, total, count in zip(per_term, values[:k], values[k:2 * k])}
    ratios = {t: float(loss_config.balance_ratio[TERM_ROLE[t]]) for t in norms if t != "ce"}
    return {"lambdas": balanced_lambdas(norms, ratios, loss_config.lam_ce), "grad_norms": norms,
            "ratios": ratios, "samples": samples}


def apply_calibration(record: dict, weights, reweighter) -> None:
    """Make the record's lambdas the run's static lambdas (and the reweighter's start and shares)."""
    weights.set_units({t: record["lambdas"][t] / weights.static[t] for t in weights.static})
    if reweighter is not None:
        reweighter.set_shares({t: 1.0 if t == "ce" else record["ratios"][t] for t in weights.static})


class InertTerms:
    """Warns once per distillation term whose weighted gradient stays below ``INERT_RATIO`` of CE's."""

    def __init__(self, stream=None):
        self.stream, self.warned = stream, set()

    def check(self, row: dict) -> list[str]:
        """Warnings for the inert terms of a metrics row not warned about yet (also printed to stderr)."""
        messages = []
        for term, ratio in row.get("grad_ratio_weighted", {}).items():
            if ratio < INERT_RATIO and term not in self.warned:
                self.warned.add(term)
                messages.append(
                    f"train_student: warning: inert term {term} ({TERM_ROLE[term]}): its weighted gradient is "
                    f"{ratio:.2e} of CE's over optimizer step {row['step']} (below {INERT_RATIO:g}); it barely "
                    "changes the update (METHOD section 9). To give it weight: --set loss.scale=balanced "
                    "(lambdas calibrated to loss.balance_ratio of CE's), --set loss.kind=kl, or a larger "
                    f"loss.lam_{term}.")
        for message in messages:
            print(message, file=self.stream or sys.stderr)
        return messages
