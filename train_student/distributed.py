"""Training on several processes under torchrun: DDP (data parallel) and FSDP2 (sharded weights).

``run.parallel``:
- ``none``: one process (no process group).
- ``ddp``: every rank holds the whole student and trains on its own canonical data streams
  (train_student.data). Its micro-steps run without any gradient sync: AGP is evaluated per sample on
  the rank's own gradient bank exactly as in one process, the samples' results are summed into the
  rank's window gradient, and that flat gradient is all-reduced (summed) ONCE per optimizer step, as are
  the reweighter's window statistics; every loss is scaled by ``1 / grad_accum`` of the whole window,
  so the sum equals one process's accumulation over the same samples.
- ``fsdp``: the student is sharded with FSDP2 (``fully_shard`` per decoder layer, then the root), so
  weights, gradients, the gradient bank's rows and the optimizer state hold ``1/world`` of the
  parameters per rank. AGP needs each sample's own term gradients, and FSDP's reduce-scatter sums the
  ranks' gradients, so every rank runs every sample (the data are not split): each term backward
  leaves the sample's gradient sharded, the bank stores the local shard, the n x n Gram matrix is the
  all-reduced sum of the per-shard Grams, the stage-2 order is drawn from the same per-sample seed on
  every rank and the coefficients are applied to each local shard. The parameters stay unsharded across
  a micro-step's term backwards (resharded after the last): the retained graph of the later backwards
  holds the unsharded weights, and one all-gather per layer serves them all.

The process group is created from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT); collectives time out after ``run.timeout_s``, so a rank whose peer died stops with
an error instead of waiting for ever (torchrun also stops the other ranks when one exits).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from train_student.config import ConfigError

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
BUCKET_ELEMENTS = 2 ** 25
"""Elements per flat all-reduce of ``.grad`` (ddp, plain mode): 128 MiB of float32."""


@dataclass
class Dist:
    """This process among the run's processes; trivial (rank 0 of 1) for ``run.parallel=none``."""

    parallel: str = "none"
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: writes the run directory, logs, checkpoints and messages."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """A process group exists (``run.parallel`` ddp or fsdp)."""
        return self.parallel != "none"

    @property
    def data_rank(self) -> int:
        return self.rank if self.parallel == "ddp" else 0

    @property
    def data_world(self) -> int:
        """Ranks that split the data (ddp: all; fsdp and none: 1, every rank runs every sample)."""
        return self.world if self.parallel == "ddp" else 1

    def sum_over_data(self, tensor: torch.Tensor) -> None:
        """In-place sum over the data-parallel ranks (nothing to do with one)."""
        if self.data_world > 1:
            dist.all_reduce(tensor)

    def sum_over_shards(self, tensor: torch.Tensor) -> None:
        """In-place sum over the ranks holding one shard each (fsdp)."""
        if self.parallel == "fsdp" and self.world > 1:
            dist.all_reduce(tensor)

    def gather_data(self, obj) -> list:
        """``obj`` of every data-parallel rank, in rank order (one collective; ``[obj]`` with one)."""
        if self.data_world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def gather_all(self, obj) -> list:
        """``obj`` of every rank, in rank order."""
        if not self.active or self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()

    def describe(self) -> str:
        if not self.active:
            return "one process"
        return f"rank 0 of {self.world} processes, run.parallel={self.parallel} (backend {dist.get_backend()})"


def pick_backend(requested: str, device: torch.device) -> str:
    """The torch.distributed backend for ``run.backend`` on ``device``; ConfigError when it is not available."""
    if not dist.is_available():
        raise ConfigError("torch.distributed is not available in this torch build; install a build with "
                          "distributed support or train with run.parallel=none")
    backend = requested if requested != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and (device.type != "cuda" or not dist.is_nccl_available()):
        reason = "this torch build has no NCCL" if not dist.is_nccl_available() else f"the device is {device}"
        raise ConfigError(f"run.backend=nccl is not available ({reason}): NCCL needs CUDA GPUs and a CUDA build "
                          "of torch; use run.backend=gloo (CPU) or run.backend=auto")
    if backend == "gloo" and not dist.is_gloo_available():
        raise ConfigError("run.backend=gloo is not available in this torch build; use run.backend=nccl on GPUs")
    return backend


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``run.device``: auto -> cuda if available; under torchrun cuda means this process's GPU (LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"run.device={name!r} but CUDA is not available; use run.device=cpu or auto")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def init_distributed(run) -> tuple[Dist, torch.device]:
    """The process group of ``run`` (a RunConfig) from torchrun's environment, and this rank's device.

    ``run.parallel=none`` under several processes, ddp/fsdp without torchrun's variables and an
    unavailable backend are ConfigErrors naming the fix."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if run.parallel == "none":
        if world > 1:
            raise ConfigError(f"launched as {world} processes (WORLD_SIZE={world}) but run.parallel=none; set "
                              "--set run.parallel=ddp (data parallel) or fsdp (sharded weights)")
        return Dist(), pick_device(run.device)
    missing = [v for v in TORCHRUN_VARIABLES if v not in os.environ]
    if missing:
        raise ConfigError(f"run.parallel={run.parallel} needs torchrun's environment (missing {missing}): launch "
                          f"with `torchrun --nproc-per-node N -m train_student ...` (or make train NPROC=N), or "
                          "train in one process with run.parallel=none")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = pick_device(run.device, local_rank)
    backend = pick_backend(run.backend, device)
    dist.init_process_group(backend, timeout=timedelta(seconds=run.timeout_s),
                            device_id=device if device.type == "cuda" else None)
    return Dist(parallel=run.parallel, rank=rank, world=world, local_rank=local_rank), device


def order_seed(seed: int, epoch: int, position: int) -> int:
    """Seed of the AGP stage-2 order of the sample at ``position`` of ``epoch``: the same on every rank and
    for every world size (a 63-bit hash of the three numbers)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ---------------------------------------------------------------- ddp: the window gradient in one all-reduce
def sum_gradients(params: list[torch.Tensor], reduce, *, bucket_elements: int = BUCKET_ELEMENTS) -> None:
    """Sum every parameter's ``.grad`` over the ranks with ``reduce`` (in place), in flat buckets of at
    most ``bucket_elements`` (one collective per bucket; the plain mode, whose gradients live in ``.grad``).
    A parameter without a gradient counts as zeros (another rank may have one)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket, size = [], 0
    for p in [*params, None]:
        if p is not None and (not bucket or size + p.numel() <= bucket_elements):
            bucket.append(p)
            size += p.numel()
            continue
        flat = torch.cat([q.grad.reshape(-1) for q in bucket])
        reduce(flat)
        for q, part in zip(bucket, flat.split([q.numel() for q in bucket])):
            q.grad.copy_(part.view_as(q))
        bucket, size = ([p], p.numel()) if p is not None else ([], 0)


# ---------------------------------------------------------------- fsdp
def decoder_layers(model) -> torch.nn.ModuleList:
    """The language model's decoder layers of an InternVL or Qwen2.5-VL student."""
    return model.model.language_model.layers


def shard_model(model, device: torch.device, world: int) -> None:
    """FSDP2: ``fully_shard`` each decoder layer, then the root (embeddings, vision tower, projector, head),
    on a 1-D mesh of ``world`` ranks of ``device``'s type (a model on the CPU moves to ``device`` shard by
    shard). From then on ``model.parameters()`` are the sharded DTensors between steps (the optimizer's and
    the gradient bank's) and other tensors while the layers are unsharded."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def sharded_grad_norms(dist: Dist, before_term_backward=None):
    """``(losses, params) -> {term: 0-d |grad loss|}`` for sharded ``params`` (the calibration's
    ``grad_norms`` under fsdp): one backward per term, the squared norms of the local gradient shards summed
    over the ranks; ``.grad`` is left empty."""
    from train_student.agp import local

    def norms(losses: dict, params: list) -> dict:
        out, terms = {}, list(losses)
        for i, term in enumerate(terms):
            last = i == len(terms) - 1
            if before_term_backward is not None:
                before_term_backward(last)
            losses[term].backward(retain_graph=not last)
            squares = [local(p.grad).float().pow(2).sum() for p in params if p.grad is not None]
            total = torch.stack(squares).sum() if squares else losses[term].new_zeros(()).float()
            dist.sum_over_shards(total)
            out[term] = total.sqrt()
            for p in params:
                p.grad = None
        return out

    return norms


def full_state(model, optimizer) -> tuple[dict, dict]:
    """FSDP: the full model and optimizer state dicts on rank 0's CPU (empty elsewhere); collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model, optimizer, state: dict) -> None:
    """FSDP: load a full optimizer state dict saved by rank 0 (``full_state``) into the sharded optimizer;
    collective, rank 0's ``state`` is broadcast."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
