"""Memory of a workload without its device: trace it on fake tensors and count live storage bytes.

Under a ``FakeTensorMode`` tensors have shapes, dtypes and devices but no data, so a real-size model
builds in seconds and its forward and backward run as metadata. ``LiveBytes`` adds up the bytes of
every tensor storage the operators create while it is alive; its high-water mark is what
``torch.cuda.max_memory_allocated`` would report for the same operators. Data that must stay real (a
sample's token ids and masks) does: an operator whose tensor inputs are all real runs for real.

Not counted: the CUDA context, the caching allocator's rounding and fragmentation, kernel workspaces
(cuBLAS, flash attention), and differences between the CPU autocast op list (used by the trace) and
CUDA's. Used by ``train_student.memory`` and ``cache_teacher.bench --estimate-memory``.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

METHOD = ("estimate, not a measurement: fake-tensor trace (pipeline.memory_trace); live tensor bytes at peak, "
          "comparable to torch.cuda.max_memory_allocated on one device; excludes the CUDA context, allocator "
          "fragmentation and kernel workspaces")


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created inside the mode that are still alive, and their peak.

    A storage is counted once however many views share it, when an operator first returns it, and
    uncounted when it is freed. ``hold`` adds bytes the trace does not create (a sample's tensors,
    which training copies to the device). ``peak_phase`` is the ``phase`` label that was set when
    the peak was reached.

    Under a ``FakeTensorMode``, sample data stays real where the model computes with it: an operator
    whose tensor inputs are all real runs for real, as does one that makes an integer tensor from
    nothing (positions, index tables); a real boolean mask indexing a fake tensor is replaced by the
    positions it selects. Only the weights and what derives from them are fake.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.phase = self.peak_phase = ""
        self._alive: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _INDEXING and len(args) > 1:
            args = (args[0], _positions(args[1]), *args[2:])
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if tensors and not any(isinstance(t, FakeTensor) for t in tensors):
            out = _real(func, args, kwargs)
        else:
            out = func(*args, **kwargs)
            if not tensors and _integer(out):  # positions, index tables made from nothing: data, not model state
                out = _real(func, args, kwargs)
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

    def reset_peak(self) -> None:
        """Start a new high-water mark from what is live now."""
        self.peak = self.live

    @contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        """Count ``nbytes`` as live inside the block."""
        self._add(nbytes)
        try:
            yield
        finally:
            self.live -= nbytes


_INDEXING = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default}


def _positions(indices: list) -> list:
    """Real boolean masks in an index list as the integer positions they select (same result), so that
    indexing a fake tensor with a known mask has a known shape."""
    out = []
    for index in indices:
        if isinstance(index, torch.Tensor) and not isinstance(index, FakeTensor) and index.dtype == torch.bool:
            with unset_fake_temporarily():
                out.extend(index.nonzero(as_tuple=True))
        else:
            out.append(index)
    return out


def _real(func, args, kwargs):
    with unset_fake_temporarily():
        return func(*args, **kwargs)


def _integer(out) -> bool:
    leaves = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    return bool(leaves) and not any(t.dtype.is_floating_point or t.dtype.is_complex for t in leaves)


@contextmanager
def fake_trace(fake: bool = True) -> Iterator[LiveBytes]:
    """A ``LiveBytes`` tracker inside a ``FakeTensorMode`` (or on real tensors with ``fake=False``)."""
    tracker = LiveBytes()
    if fake:
        with FakeTensorMode(allow_non_fake_inputs=True), tracker:
            yield tracker
    else:
        with tracker:
            yield tracker
