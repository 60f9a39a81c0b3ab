"""The micro-step: one sample's loss terms, their gradients and how they are combined.

Per sample (METHOD sections 3-6): one student forward with attention captured at only the layers
the sample's terms read (SDPA elsewhere); raw losses ``ce`` (answer tokens), ``p`` / ``d``
(text-to-vision blocks at layers 0 / L-2) and ``r`` (intermediate maps against group means);
per-sample weights ``w_ce = lambda_ce``, ``w_c = mix[capability][c] * lambda_c`` (lambdas learned
when reweighting). Every loss is scaled by ``1 / grad_accum`` before its backward, as in the
reference trainer, so a window's gradient is the mean over its samples.

Two ways to turn the terms into a gradient:
- bank (AGP and/or reweighting): one backward per term into a ``GradBank`` row (unweighted), then
  ``agp_step`` on the Gram matrix (or the plain weighted combination) into the window total;
- plain (no AGP, no reweighting, SFT): the weighted sum in ONE backward, accumulating in ``.grad``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.attention.capture import AttentionCapture
from pipeline.attention.maps import tril_to_dense, tv_block
from schemas.method import LOSS_TERMS, TERM_ROLE, TERMS, LayerPlan, lambdas
from train_student.agp import NORM_FLOOR, GradBank, agp_step
from train_student.data import TrainItem
from train_student.distributed import Dist, sum_gradients
from train_student.losses import attention_losses
from train_student.metrics import WindowStats
from train_student.mixing import normalise_mix
from train_student.reweight import LossReweighter

IGNORE_INDEX = -100


class NonFiniteLossError(RuntimeError):
    """A NaN/inf loss or gradient: training stops before the optimizer step (nothing is saved)."""


# ---------------------------------------------------------------- loss terms
def answer_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of the answer tokens.

    Args:
        logits: ``[K, V]`` logits at positions ``answer_start-1 .. S-2`` (each predicts the next token).
        labels: ``[K]`` the labels at ``answer_start .. S-1`` (-100 after the answer).
    """
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)


def distill_losses(maps: dict[int, Tensor], is_vision: Tensor, targets: dict[str, Tensor], plan: LayerPlan,
                   terms, kind: str = "mse") -> dict[str, Tensor]:
    """Raw attention losses of ``terms``, of ``kind`` (``loss.kind``: mse, kl or cosine).

    Args:
        maps: layer -> student head-mean map ``[S, S]`` (with gradients).
        is_vision: ``[S]`` bool (CPU).
        targets: role -> target; perception / planning ``[n_text, n_vision]``; reasoning ``[k, S, S]``
            or packed lower triangles ``[k, S*(S+1)/2]``.
    """
    tv_loss, maps_loss = attention_losses(kind)
    losses = {}
    for term in (t for t in ("p", "d") if t in terms):
        (layer,) = plan.term_layers(term)
        losses[term] = tv_loss(tv_block(maps[layer], is_vision), targets[TERM_ROLE[term]])
    if "r" in terms:
        student = torch.stack([maps[layer] for layer in plan.term_layers("r")])
        target = targets[TERM_ROLE["r"]]
        if target.dim() == 2:
            target = tril_to_dense(target, student.shape[-1])
        losses["r"] = maps_loss(student, target)
    return losses


def student_losses(logits: Tensor, maps: dict[int, Tensor], item: TrainItem, plan: LayerPlan, terms,
                   device: torch.device, kind: str = "mse") -> dict[str, Tensor]:
    """``ce`` from logits ``[1, K, V]`` kept from ``answer_start - 1`` on, plus the attention terms."""
    labels = item.labels[item.answer_start:].to(device, non_blocking=True)
    targets = {role: t.to(device, non_blocking=True) for role, t in item.targets.items()}
    return {"ce": answer_ce(logits[0, :-1], labels),
            **distill_losses(maps, item.is_vision, targets, plan, terms, kind)}


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


@dataclass
class CapturedForward:
    """Student forward capturing head-mean maps at only the layers the terms read."""

    model: torch.nn.Module
    plan: LayerPlan
    device: torch.device
    autocast_dtype: torch.dtype | None = None
    recompute_attention: bool = False
    loss_kind: str = "mse"

    def __call__(self, item: TrainItem, terms) -> dict[str, Tensor]:
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in item.inputs.items()}
        keep = item.labels.numel() - item.answer_start + 1
        with autocast_context(self.device, self.autocast_dtype), \
                AttentionCapture(self.model, self.plan.layers(terms), recompute=self.recompute_attention) as cap:
            out = self.model(**inputs, use_cache=False, logits_to_keep=keep)
        maps = {layer: m[0] for layer, m in cap.maps.items()}
        return student_losses(out.logits, maps, item, self.plan, terms, self.device, self.loss_kind)


# ---------------------------------------------------------------- weights
def active_lambdas(loss_config, terms: list[str]) -> dict[str, float]:
    """``{term: lambda}`` of ``ce`` and ``terms`` whose configured lambda is positive (the run's static weights)."""
    lams = lambdas(loss_config)
    return {t: float(lams[t]) for t in ["ce", *terms] if lams[t] > 0}


class TermWeights:
    """Per-sample term weights from the lambdas (static, or learned by ``reweighter``, times the units
    of a ``loss.scale=balanced`` calibration, ``set_units``) and the mix."""

    def __init__(self, loss_config, terms: list[str], device: torch.device, reweighter: LossReweighter | None = None):
        self.static = active_lambdas(loss_config, terms)
        self.mix = normalise_mix(loss_config.mix)
        self.device, self.reweighter = device, reweighter
        self.units = torch.ones(len(LOSS_TERMS), device=device)
        self._per_capability: dict[str, tuple[list[str], Tensor, Tensor]] = {}
        self._lambdas: Tensor | None = None

    def lambdas(self) -> Tensor:
        """``[4]`` current lambdas in LOSS_TERMS (0 for inactive terms), on the device: the static or
        learned weights times the calibrated units (1 unless ``loss.scale=balanced``)."""
        if self._lambdas is None:
            learned = self.reweighter.weights() if self.reweighter is not None else {}
            zero = torch.zeros((), device=self.device)
            self._lambdas = torch.stack([learned[t] if t in learned else zero + self.static.get(t, 0.0)
                                         for t in LOSS_TERMS]) * self.units
        return self._lambdas

    def refresh(self) -> None:
        """Forget the cached lambdas (after a reweighting step)."""
        self._lambdas = None

    def set_units(self, units: dict[str, float]) -> None:
        """Per-term factors on the static / learned weights (``loss.scale=balanced``: calibrated lambda
        over configured lambda), for the terms of this run."""
        if set(units) != set(self.static):
            raise ValueError(f"units for terms {sorted(units)}, this run has {sorted(self.static)}")
        self.units = torch.tensor([float(units.get(t, 1.0)) for t in LOSS_TERMS], device=self.device)
        self.refresh()

    def for_sample(self, capability: str) -> tuple[list[str], Tensor, Tensor]:
        """(present terms, ``[n]`` term ids, ``[n]`` weights) for a sample of ``capability``;
        terms whose weight is 0 are left out; ``ce`` is always first."""
        if capability not in self._per_capability:
            row = dict(zip(TERMS, self.mix[capability]))
            present = ["ce"] + [t for t in TERMS if t in self.static and row[t] > 0]
            ids = torch.tensor([LOSS_TERMS.index(t) for t in present], device=self.device)
            factors = torch.tensor([1.0] + [row[t] for t in present[1:]], device=self.device)
            self._per_capability[capability] = (present, ids, factors)
        present, ids, factors = self._per_capability[capability]
        return present, ids, self.lambdas()[ids] * factors


# ---------------------------------------------------------------- combining the term gradients
def bank_combine(bank: GradBank, n: int, generator: torch.Generator, weights: Tensor, agp: bool) -> dict[str, Tensor]:
    """AGP on the bank's rows (``agp_step``), or their plain weighted sum; returns cos/norms (+fired)."""
    if agp:
        return agp_step(bank, n, generator, weights=weights)
    gram = bank.gram(n)
    norms = gram.diagonal().clamp_min(0).sqrt()
    bank.combine(weights, n)
    return {"cos": gram / (norms[:, None] * norms[None, :]).clamp_min(NORM_FLOOR), "norms": norms}


Combine = Callable[[object, int, torch.Generator, Tensor, bool], dict]


class MicroStepper:
    """Runs micro-steps, keeps the window's statistics and applies optimizer steps.

    bank None: plain mode (one backward of the weighted sum). Otherwise one backward per term into
    ``bank`` and ``combine(bank, n, generator, weights, agp)`` (``bank_combine`` for a GradBank).
    ``dist``: the run's processes (train_student.distributed; None: one process): with data-parallel ranks
    the window's statistics, gradient and reweighting statistics are summed over them at the window's end.
    ``before_term_backward(last)``: called before each term backward of the bank mode (fsdp: reshard the
    parameters only after the last).
    """

    def __init__(self, *, forward: Callable, weights: TermWeights, params: list, device: torch.device,
                 scale: float = 1.0, bank=None, combine: Combine = bank_combine, agp: bool = False,
                 generator: torch.Generator | None = None, dist: Dist | None = None,
                 before_term_backward: Callable[[bool], None] | None = None):
        if agp and (bank is None or generator is None):
            raise ValueError("AGP needs a gradient bank and an order generator")
        self.forward, self.weights, self.params, self.scale = forward, weights, params, scale
        self.bank, self.combine, self.agp, self.generator = bank, combine, agp, generator
        self.dist, self.before_term_backward = dist or Dist(), before_term_backward
        self.stats = WindowStats(device, loss_scale=scale)

    def micro_step(self, item: TrainItem) -> None:
        present, ids, weights = self.weights.for_sample(item.capability)
        losses = self.forward(item, present[1:])
        raw = torch.stack([losses[t] for t in present])
        total = (weights * raw.detach()).sum()
        if self.bank is None:
            ((weights * raw).sum() * self.scale).backward()
            self.stats.add(item.key, ids, raw, total)
            return
        n = len(present)
        for row, term in enumerate(present):
            if self.before_term_backward is not None:
                self.before_term_backward(row == n - 1)
            (losses[term] * self.scale).backward(retain_graph=row < n - 1)
            self.bank.store(row)
        stats = self.combine(self.bank, n, self.generator, weights, self.agp)
        if self.weights.reweighter is not None:  # norms in calibrated units: the reweighter learns a factor on them
            self.weights.reweighter.observe({t: losses[t] for t in present},
                                            dict(zip(present, (stats["norms"] * self.weights.units[ids]).unbind())))
        self.stats.add(item.key, ids, raw, total, stats)

    def finish_window(self, step: int, *, extra=None) -> dict:
        """The window's host summary over all data-parallel ranks (one sync; ``extra`` travels along, see
        ``WindowStats.collect``); raises NonFiniteLossError, on every rank, before anything is applied."""
        summary = self.stats.collect(self.weights.lambdas(), gather=self.dist.gather_data, extra=extra)
        self.stats.reset()
        if summary["nonfinite_key"] is not None:
            raise NonFiniteLossError(
                f"non-finite loss or gradient at optimizer step {step}, sample {summary['nonfinite_key']} (window "
                f"mean raw losses {summary['losses']}). Stopped before the optimizer step; no checkpoint was written "
                "for it and earlier checkpoints are intact. Check that sample's cached maps "
                "(pipeline.cache_reader.open_cache(DIR)[key]) and the learning rate.")
        return summary

    def apply(self, optimizer, scheduler, *, max_grad_norm: float | None = None) -> None:
        """Window gradient into ``.grad`` (summed over the data-parallel ranks: one all-reduce of the bank's
        flat window total, or of ``.grad`` in buckets), optional clipping, optimizer and schedule step,
        reweighting (its window statistics summed over the ranks first)."""
        data_parallel = self.dist.data_world > 1
        if self.bank is not None:
            self.dist.sum_over_data(self.bank.total)
            self.bank.flush_to_grads()
        elif data_parallel:
            sum_gradients(self.params, self.dist.sum_over_data)
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if self.weights.reweighter is not None:
            if data_parallel:
                self.weights.reweighter.sum_window(self.dist.sum_over_data)
            self.weights.reweighter.step()
            self.weights.refresh()


# ---------------------------------------------------------------- the student model
def vision_tower(model) -> torch.nn.Module:
    """The vision encoder of an InternVL (``vision_tower``) or Qwen2.5-VL (``visual``) model."""
    inner = getattr(model, "model", model)
    for name in ("vision_tower", "visual"):
        if hasattr(inner, name):
            return getattr(inner, name)
    raise ValueError(f"{type(model).__name__}: no vision tower found (expected model.vision_tower or model.visual)")


def prepare_student(model, *, freeze_vision: bool, gradient_checkpointing: bool, captured: list[int]) -> str:
    """Training mode, optional frozen vision tower, optional gradient checkpointing of every decoder
    layer NOT in ``captured`` (recomputing a captured layer would detach its map). Returns a summary."""
    model.train()
    if freeze_vision:
        vision_tower(model).requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    summary = f"{trainable / 1e6:.1f}M trainable parameters" + (" (vision tower frozen)" if freeze_vision else "")
    if gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})  # (the older name of the same method takes the same first argument)
        layers = model.model.language_model.layers
        for index in captured:
            layers[index].gradient_checkpointing = False
        summary += (f"; gradient checkpointing on the vision tower and {len(layers) - len(set(captured))} of "
                    f"{len(layers)} decoder layers (captured layers {sorted(set(captured))} are not recomputed)")
    return summary
