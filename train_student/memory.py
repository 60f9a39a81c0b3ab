"""Peak device memory of training, estimated without the device.

``estimate_peak`` builds the student from its config on fake tensors (``pipeline.memory_trace``: what
is and is not counted), then runs the trainer's own pieces on it: ``build_trainer`` (the set-up
``python -m train_student`` uses: model preparation, stepper, optimizer, schedule), micro-steps with the current sample's tensors held as live, the optimizer step. It
answers "which options does a 24 GB card need" before renting one; a measurement on the card
(``python -m train_student.bench``) supersedes it. The online-teacher ablation syncs per parameter
(data-dependent) and is not estimable this way.

Several GPUs (``per_gpu``, train_student.distributed): ddp keeps a whole replica per GPU, so its figure is
the one-process trace (plus one flat all-reduce bucket of ``.grad`` in the plain mode). fsdp shards the
persistent state; its figure is derived from the same trace's parts: during a micro-step the weights,
the gradient bank, the optimizer state and the term's gradient are held as ``1/world`` shards, and one
unsharded copy of the weights is held across the term backwards; the activations are the sample's, as
in one process; the optimizer step runs on shards only.
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
from train_student.distributed import BUCKET_ELEMENTS, decoder_layers
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
        bank), "after_step_gib" (+ optimizer state), "trainable_params", "seq_len", "weights_gib" (every
        parameter), "decoder_weights_gib" / "decoder_layers" (the language model's decoder layers),
        "phase_peaks_gib" ({phase: peak of its last window}: the micro-steps with the optimizer state live,
        the optimizer step)}``.
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
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        layers = decoder_layers(model)
        layer_weights = sum(p.numel() * p.element_size() for p in layers.parameters())
        accum = config.optim.grad_accum
        peak, peak_phase, phase_peaks = tracker.peak, "", {}
        for window in range(windows):
            for phase in ("micro-step", "optimizer step"):
                tracker.phase = phase
                tracker.reset_peak()
                if phase == "micro-step":
                    for j in range(accum):
                        item = items[(window * accum + j) % len(items)]
                        with tracker.hold(item_bytes(item)):
                            stepper.micro_step(item)
                    stepper.stats.reset()  # the window summary syncs to the host; training reads it here
                else:
                    stepper.apply(optimizer, scheduler)
                phase_peaks[phase] = tracker.peak
                if tracker.peak > peak:
                    peak, peak_phase = tracker.peak, phase
        after_step = tracker.live
        trainable = sum(p.numel() for p in stepper.params)
    return {"peak_gib": peak / GIB, "peak_phase": peak_phase, "setup_gib": setup / GIB,
            "after_step_gib": after_step / GIB, "trainable_params": trainable,
            "seq_len": max(it.labels.numel() for it in items), "weights_gib": weights / GIB,
            "decoder_weights_gib": layer_weights / GIB, "decoder_layers": len(layers),
            "phase_peaks_gib": {k: v / GIB for k, v in phase_peaks.items()}}


def per_gpu(estimate: dict, *, world_size: int, parallel: str, plain: bool) -> dict:
    """The peak per GPU of ``estimate`` (``estimate_peak``, one process) for ``world_size`` GPUs under
    ``parallel`` (none, ddp, fsdp; see the module docstring). ``plain``: the run has no gradient bank (one
    backward per micro-step: under fsdp only the root's weights and about two decoder layers are unsharded
    at a time; under ddp its ``.grad`` is all-reduced in buckets). Returns ``{"peak_gib", "peak_phase"}``."""
    micro, step = estimate["phase_peaks_gib"]["micro-step"], estimate["phase_peaks_gib"]["optimizer step"]
    if parallel == "fsdp":
        weights, grads = estimate["weights_gib"], estimate["trainable_params"] * 4 / GIB
        optimizer = estimate["after_step_gib"] - estimate["setup_gib"]
        bank = estimate["setup_gib"] - weights
        layers = estimate["decoder_weights_gib"]
        unsharded = weights - layers * (1 - min(2, estimate["decoder_layers"]) / estimate["decoder_layers"]) \
            if plain else weights
        micro += unsharded - weights * (1 - 1 / world_size) - (optimizer + bank + grads) * (1 - 1 / world_size)
        step /= world_size
    elif parallel == "ddp" and world_size > 1 and plain:
        step += min(BUCKET_ELEMENTS, estimate["trainable_params"]) * 4 / GIB
    phases = {"micro-step": micro, "optimizer step": step}
    phase = max(phases, key=phases.get)
    return {"peak_gib": phases[phase], "peak_phase": phase}
