"""Peak device memory of training, estimated without the device.

``estimate_peak`` builds the student from its config under a ``FakeTensorMode`` (tensors that have
shapes, dtypes and devices but no data), then runs the trainer's own pieces on it: ``prepare_student``,
``build_stepper``, micro-steps, the optimizer step. ``LiveBytes``, a dispatch mode, adds up the bytes
of every live tensor storage as the operators create and free them and keeps the high-water mark.
The sample data stays real: an operator whose tensor inputs are all real runs for real, so index
lookups and the model's data-dependent checks behave as in training.

What it counts is what ``torch.cuda.max_memory_allocated`` counts: parameters, gradients, the gradient
bank, optimizer state, activations kept for backward, transient buffers, the current sample's tensors.
What it cannot see: the CUDA context, the caching allocator's rounding and fragmentation, kernel
workspaces (cuBLAS, flash attention), and the op list of CUDA autocast (CPU autocast's stands in;
linear layers and matmuls run in bf16 under both). So it answers "which options does a 24 GB card
need" before renting one; a measurement on the card (``python -m train_student.bench``) supersedes it.
The online-teacher ablation syncs per parameter (data-dependent) and is not estimable this way.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import AutoModelForImageTextToText

from pipeline.capture import enable_capture
from train_student import config as cfg
from train_student.data import TrainItem
from train_student.step import LayerPlan, prepare_student
from train_student.train import build_stepper, cosine_schedule

GB = 2**30


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created inside the mode that are still alive, and their peak.

    A storage is counted once however many views share it, when an operator first returns it, and
    uncounted when it is freed. ``hold`` adds bytes the trace does not create (a sample's tensors,
    which training copies to the device). ``peak_phase`` is the ``phase`` label that was set when
    the peak was reached. Operators whose tensor inputs are all real (no
    ``FakeTensor``) run for real even under a ``FakeTensorMode``.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.phase = self.peak_phase = ""
        self._alive: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if tensors and not any(isinstance(t, FakeTensor) for t in tensors):
            with unset_fake_temporarily():
                out = func(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._count(leaf.untyped_storage())
        return out

    def _count(self, storage) -> None:
        key = id(storage)
        known = self._alive.get(key)
        if known is not None and known() is storage:
            return
        nbytes = storage.nbytes()
        self._alive[key] = weakref.ref(storage)
        weakref.finalize(storage, self._free, key, nbytes)
        self._add(nbytes)

    def _free(self, key: int, nbytes: int) -> None:
        self._alive.pop(key, None)
        self.live -= nbytes

    def _add(self, nbytes: int) -> None:
        self.live += nbytes
        if self.live > self.peak:
            self.peak, self.peak_phase = self.live, self.phase

    @contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        """Count ``nbytes`` as live inside the block."""
        self._add(nbytes)
        try:
            yield
        finally:
            self.live -= nbytes


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
        ``{"peak_gb", "peak_phase" ("micro-step" or "optimizer step"), "setup_gb" (model + gradient
        bank), "after_step_gb" (+ optimizer state), "trainable_params", "seq_len"}``.
    """
    if config.model.online_teacher:
        raise ValueError("the online-teacher ablation syncs per parameter and cannot be traced; "
                         "measure it on the device with python -m train_student.bench")
    device = torch.device("cpu")
    tracker = LiveBytes()
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else nullcontext(), tracker:
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_config(student_config, attn_implementation="sdpa")
        plan = LayerPlan.for_student(student_config.get_text_config().num_hidden_layers,
                                     config.loss.mid_start, config.loss.mid_end)
        enable_capture(model)
        prepare_student(model, freeze_vision=config.model.freeze_vision,
                        gradient_checkpointing=config.model.gradient_checkpointing,
                        captured=plan.layers(config.terms))
        stepper, _, _ = build_stepper(config, model, plan, device)
        setup = tracker.live
        optimizer = torch.optim.AdamW(stepper.params, lr=config.optim.lr, weight_decay=config.optim.weight_decay)
        scheduler = cosine_schedule(optimizer, total_steps=windows, warmup=0, floor=0.01)
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
    return {"peak_gb": tracker.peak / GB, "peak_phase": tracker.peak_phase, "setup_gb": setup / GB, "after_step_gb": after_step / GB,
            "trainable_params": trainable, "seq_len": max(it.labels.numel() for it in items)}
