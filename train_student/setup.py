"""The trainer's set-up, one component for training, the benchmark and the memory estimate.

``build_trainer`` prepares the student (attention capture at the layers the terms read, freezing,
gradient checkpointing) and builds the micro-stepper (forward, term weights, reweighter, gradient bank,
AGP order generator), the AdamW optimizer and the cosine schedule, all from the ``TrainConfig``; so
``python -m train_student.bench`` and ``train_student.memory`` measure the configuration a user trains
with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.attention.capture import enable_capture
from schemas.method import LayerPlan
from train_student import config as cfg
from train_student.agp import GradBank
from train_student.distributed import Dist, shard_model
from train_student.reweight import LossReweighter
from train_student.step import CapturedForward, MicroStepper, TermWeights, active_lambdas, bank_combine, prepare_student


@dataclass
class TrainerParts:
    """What ``build_trainer`` returns; ``summary`` describes the prepared model (trainable parameters)."""

    stepper: MicroStepper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    reweighter: LossReweighter | None
    generator: torch.Generator | None
    summary: str


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast for bf16, and for auto on GPU; None (fp32) otherwise. Weights stay fp32."""
    return torch.bfloat16 if precision == "bf16" or (precision == "auto" and device.type == "cuda") else None


def cosine_schedule(optimizer, *, total_steps: int, warmup: int, floor: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then ``max(floor, 0.5 * (1 + cos(pi * progress)))`` of the base lr (reference)."""
    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return max(floor, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_stepper(config: cfg.TrainConfig, model, plan: LayerPlan, device: torch.device, *, teacher=None,
                  dist: Dist | None = None):
    """The micro-step machinery: forward (cached, or online with ``teacher``), term weights,
    reweighter, gradient bank and AGP order generator. ``dist``: the run's processes (fsdp: ``model`` is
    sharded, the bank holds local shards and sums its Gram matrix over the ranks)."""
    m, terms = config.method, config.terms
    dist = dist or Dist()
    fsdp = dist.parallel == "fsdp"
    reweighter = None
    if m.reweight and terms:
        reweighter = LossReweighter(active_lambdas(config.loss, terms), alpha=m.reweight_alpha, lr=m.reweight_lr,
                                    ce_floor=m.ce_floor, device=device)
    weights = TermWeights(config.loss, terms, device, reweighter)
    generator = torch.Generator().manual_seed(config.run.seed) if m.agp else None
    dtype = autocast_dtype(config.model.precision, device)
    params = [p for p in model.parameters() if p.requires_grad]
    bank, combine = None, bank_combine
    if teacher is not None:
        from train_student.online import OnlineForward, ParameterGrads, per_parameter_combine

        forward = OnlineForward(model, teacher, plan, device, dtype, config.loss.kind)
        if m.agp or m.reweight:
            bank, combine = ParameterGrads(params), per_parameter_combine
    else:
        forward = CapturedForward(model, plan, device, dtype, config.model.recompute_attention, config.loss.kind)
        if m.agp or m.reweight:
            bank = GradBank(params, 1 + len(terms), dtype=torch.bfloat16 if m.bank_dtype == "bf16" else torch.float32,
                            reduce=dist.sum_over_shards if fsdp else None)
    stepper = MicroStepper(forward=forward, weights=weights, params=params, device=device,
                           scale=1.0 / config.optim.grad_accum, bank=bank, combine=combine, agp=m.agp,
                           generator=generator, dist=dist,
                           before_term_backward=model.set_reshard_after_backward if fsdp else None)
    return stepper, reweighter, generator


def build_trainer(config: cfg.TrainConfig, model, plan: LayerPlan, device: torch.device, *, total_steps: int,
                  teacher=None, dist: Dist | None = None) -> TrainerParts:
    """Prepare ``model`` (on ``device``; with ``dist.parallel == "fsdp"`` on the CPU, sharded here onto
    ``device``) and build its stepper, optimizer and schedule from ``config``.

    ``teacher``: an online teacher (the ablation; the student then runs eager attention), else the
    student's attention is captured at ``plan.layers(config.terms)``. ``total_steps``: optimizer steps
    the cosine schedule spans. ``dist``: the run's processes (train_student.distributed; None: one).
    """
    if teacher is None:
        enable_capture(model)
    summary = prepare_student(model, freeze_vision=config.model.freeze_vision,
                              gradient_checkpointing=config.model.gradient_checkpointing,
                              captured=plan.layers(config.terms))
    if dist is not None and dist.parallel == "fsdp":
        shard_model(model, device, dist.world)
        summary += f"; FSDP2: sharded over {dist.world} ranks per decoder layer"
    stepper, reweighter, generator = build_stepper(config, model, plan, device, teacher=teacher, dist=dist)
    o = config.optim
    optimizer = torch.optim.AdamW(stepper.params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    scheduler = cosine_schedule(optimizer, total_steps=total_steps, warmup=o.warmup_steps, floor=o.lr_floor)
    return TrainerParts(stepper=stepper, optimizer=optimizer, scheduler=scheduler, reweighter=reweighter,
                        generator=generator, summary=summary)
