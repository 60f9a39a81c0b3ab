"""Checkpoints: ``RUN_DIR/checkpoint-STEP/`` and the ``RUN_DIR/latest`` pointer.

A checkpoint directory holds the student (``save_pretrained`` + processor: loadable with
transformers alone), ``trainer_state.pt`` (optimizer, scheduler, reweighting state, RNG states incl.
the AGP order generator) and ``meta.json`` (format version, resolved config, loop state: optimizer
step, epoch, data position, samples, log sizes; the balanced-scale calibration, if any). It is written to ``checkpoint-STEP.tmp`` and
renamed, then ``latest`` is replaced atomically, so a kill never leaves a half checkpoint behind
``latest``. Checkpoints are only written at optimizer-step boundaries after finite losses.

Several processes (train_student.distributed): rank 0 writes; under fsdp the full model and optimizer
state are gathered to it first (the directory is the same as one process writes, loadable with
transformers alone); the RNG states of every rank are kept (``rng_ranks``), and ``meta.json`` records
the world size, which a resume must match.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from schemas.checkpoint import (
    CALIBRATION_KEYS,
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    LATEST_NAME,
    META_NAME,
    STATE_NAME,
    LoopState,
)
from train_student.config import differences
from train_student.distributed import Dist, full_state, load_full_optimizer_state


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (missing, other version, incompatible config)."""


def rng_state(generator: torch.Generator | None) -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["agp_order"] = generator.get_state()
    return state


def set_rng_state(state: dict, generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None:
        generator.set_state(state["agp_order"])


def save_checkpoint(run_dir: Path, *, model, processor, optimizer, scheduler, reweighter, generator,
                    loop: LoopState, config: dict, keep_last: int = 0, calibration: dict | None = None,
                    dist: Dist | None = None) -> Path:
    """Write ``checkpoint-{loop.step}``, point ``latest`` at it and prune to ``keep_last`` (0: keep all);
    ``calibration``: the ``loss.scale=balanced`` record (``train_student.scale.calibrate``). With several
    processes every rank calls it (the states are gathered) and rank 0 writes."""
    dist = dist or Dist()
    model_state, optimizer_state = (full_state(model, optimizer) if dist.parallel == "fsdp"
                                    else (None, optimizer.state_dict()))
    rngs = dist.gather_all(rng_state(generator))
    name = f"checkpoint-{loop.step}"
    final, tmp = run_dir / name, run_dir / f"{name}.tmp"
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=model_state)
        processor.save_pretrained(tmp)
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                    "reweighter": reweighter.state_dict() if reweighter is not None else None,
                    "rng": rngs[0], **({"rng_ranks": rngs} if len(rngs) > 1 else {})}, tmp / STATE_NAME)
        meta = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": config, "loop": asdict(loop),
                "calibration": calibration, "world_size": dist.world}
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = run_dir / f"{LATEST_NAME}.tmp"
        pointer.write_text(name + "\n", encoding="utf-8")
        os.replace(pointer, run_dir / LATEST_NAME)
        if keep_last:
            steps = sorted(int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*")
                           if p.name.split("-")[1].isdigit())
            for step in steps[:-keep_last]:
                shutil.rmtree(run_dir / f"checkpoint-{step}", ignore_errors=True)
    dist.barrier()  # every rank returns once the checkpoint is complete
    return final


def find_checkpoint(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from: ``resume`` (a path, or "latest"), else RUN_DIR/latest if present."""
    pointer = run_dir / LATEST_NAME
    if resume not in (None, "latest"):
        path = Path(resume)
    elif pointer.is_file():
        path = run_dir / pointer.read_text(encoding="utf-8").strip()
    elif resume == "latest":
        raise CheckpointError(f"--resume: {run_dir} has no {LATEST_NAME} checkpoint pointer; train without --resume "
                              "to start this run, or pass --resume CHECKPOINT_DIR")
    else:
        return None
    if not (path / META_NAME).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {META_NAME}); pass --resume with a "
                              f"checkpoint-STEP directory of this run, or remove {pointer} to start over")
    return path


def read_meta(path: Path, config: dict, *, world_size: int = 1) -> tuple[dict, LoopState]:
    """The checkpoint's meta and loop state; refuses another format version, a differing config or another
    world size (``world_size``: this run's processes)."""
    meta = json.loads((path / META_NAME).read_text(encoding="utf-8"))
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint {meta.get('format')!r} version {meta.get('version')!r}; this "
                              f"trainer resumes {CHECKPOINT_FORMAT!r} version {CHECKPOINT_VERSION}")
    saved_world = meta.get("world_size", 1)  # absent in metas of one-process runs before distributed training
    if saved_world != world_size:
        launch = (f"torchrun --nproc-per-node {saved_world} -m train_student ... (make train NPROC={saved_world})"
                  if saved_world > 1 else "python -m train_student ... (make train)")
        raise CheckpointError(
            f"cannot resume from {path}: it was written by a run of world size {saved_world} (run.parallel="
            f"{meta['config'].get('run', {}).get('parallel', 'none')}), this run has world size {world_size}. An "
            f"exact resume needs the same world size: relaunch as {launch}, or start a new --out")
    diffs = differences(meta["config"], config)
    if diffs:
        raise CheckpointError(f"cannot resume from {path}: the config differs in " + "; ".join(diffs) +
                              ". Resume with the checkpoint's settings (see its meta.json) or use another --out.")
    balanced = config.get("loss", {}).get("scale") == "balanced"
    calibration = meta.get("calibration")
    if balanced and not (isinstance(calibration, dict) and set(CALIBRATION_KEYS) <= set(calibration)):
        raise CheckpointError(f"{path}: loss.scale=balanced but the checkpoint's meta.json has no complete calibration "
                              f"record (keys {list(CALIBRATION_KEYS)}, found {calibration!r}); an exact resume needs "
                              "the lambdas of the first window: restore meta.json or start a new --out")
    return meta, LoopState(**meta["loop"])


def restore_state(path: Path, *, optimizer, scheduler, reweighter, generator, model=None,
                  dist: Dist | None = None) -> None:
    """Load optimizer, scheduler, reweighting and RNG states saved by ``save_checkpoint`` (fsdp: the full
    optimizer state read on rank 0 and sharded into ``model``'s optimizer; every rank its own RNG state)."""
    dist = dist or Dist()
    fsdp = dist.parallel == "fsdp"  # every rank maps the file; only rank 0 reads the full optimizer state
    state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True, mmap=fsdp)
    if fsdp:
        load_full_optimizer_state(model, optimizer, state["optimizer"] if dist.main else {})
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if reweighter is not None:
        reweighter.load_state_dict(state["reweighter"])
    set_rng_state(state["rng_ranks"][dist.rank] if "rng_ranks" in state else state["rng"], generator)
