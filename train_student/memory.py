"""Peak device memory of training, estimated without the device.

``estimate_peak`` builds the student from its config on fake tensors (``pipeline.memory_trace``: what
is and is not counted), then runs the trainer's own pieces on it: ``build_trainer`` (the set-up
``python -m train_student`` uses: model preparation, stepper, optimizer, schedule), micro-steps with the current sample's tensors held as live, the optimizer step. It
answers "which options does a 24 GB card need" before renting one; a measurement on the card
(``python -m train_student.bench``) supersedes it. The online-teacher ablation syncs per parameter
(data-dependent) and is not estimable this way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import AutoModelForImageTextToText

from pipeline.measure.memory_trace import fake_trace
from pipeline.measure.results import GIB
from schemas.method import LayerPlan
from train_student import config as cfg
from train_student.data import TrainItem
from train_student.setup import build_trainer


def item_bytes(item: TrainItem) -> int:
    """Bytes of a sample's tensors that a micro-step moves to the device."""
    tensors = [*item.inputs.values(), *item.targets.values(), item.labels]
    return sum(t.numel() * t.element_size() for t in tensors)


def estimate_peak(student_config, config: cfg.TrainConfig, items: Sequence[TrainItem], *, windows: int = 2,
                  fake: bool = True) -> dict:
    """Trace ``windows`` optimizer steps of ``config`` on a student built from ``student_config``.

    Args:
        student_config: a transformers config of the student (e.g. ``pipeline.models.real_config``).
        config: the training config (its ``model.precision`` decides autocast, as in training).
        items: samples fed round-robin, ``optim.grad_accum`` per optimizer step.
        windows: optimizer steps traced (2: the second one has the optimizer state from the start;
            from the second micro-step of a window on, the accumulated gradients are live too).
        fake: False runs the same trace on real CPU tensors (slow at real shapes; used to check the
            fake trace).

    Returns:
        ``{"peak_gib", "peak_phase" ("micro-step" or "optimizer step"), "setup_gib" (model + gradient
        bank), "after_step_gib" (+ optimizer state), "trainable_params", "seq_len"}``.
    """
    if config.model.online_teacher:
        raise ValueError("the online-teacher ablation syncs per parameter and cannot be traced; "
                         "measure it on the device with python -m train_student.bench")
    device = torch.device("cpu")
    with fake_trace(fake) as tracker:
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_config(student_config, attn_implementation="sdpa")
        plan = LayerPlan.for_model(student_config.get_text_config().num_hidden_layers,
                                   config.loss.mid_start, config.loss.mid_end)
        parts = build_trainer(config, model, plan, device, total_steps=windows)
        stepper, optimizer, scheduler = parts.stepper, parts.optimizer, parts.scheduler
        setup = tracker.live
        accum = config.optim.grad_accum
        for window in range(windows):
            tracker.phase = "micro-step"
            for j in range(accum):
                item = items[(window * accum + j) % len(items)]
                with tracker.hold(item_bytes(item)):
                    stepper.micro_step(item)
            stepper.stats.reset()  # the window summary syncs to the host; training reads it here
            tracker.phase = "optimizer step"
            stepper.apply(optimizer, scheduler)
        after_step = tracker.live
        trainable = sum(p.numel() for p in stepper.params)
    return {"peak_gib": tracker.peak / GIB, "peak_phase": tracker.peak_phase, "setup_gib": setup / GIB, "after_step_gib": after_step / GIB,
            "trainable_params": trainable, "seq_len": max(it.labels.numel() for it in items)}
