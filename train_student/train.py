"""The student job: ``python -m train_student --student S --data D --cache ROLE=DIR --out RUN``, or
``torchrun --nproc-per-node N -m train_student ... --set run.parallel=ddp|fsdp`` (train_student.distributed).

Reads top to bottom: setup (processes and device -> run directory and resume point -> seeds -> data
preflight -> model -> method: term weights, AGP bank, reweighting -> optimizer and schedule -> resume)
-> train (the loop over the epochs' streams; optimizer step k of an epoch covers its positions
``[k * grad_accum, (k + 1) * grad_accum)`` on all ranks together) -> cleanup (final checkpoint, report).
Rank 0 writes the run directory, logs and checkpoints. No teacher is loaded unless ``--online-teacher``
(ablation/benchmark only) is given.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from itertools import takewhile
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import get_error_handler
from tqdm import tqdm
from transformers import AutoConfig

from pipeline.data.shards import ShardError
from pipeline.measure.results import PeakMemory
from pipeline.models.load import load_model, resolve_model
from pipeline.models.processors import family_of, load_processor
from schemas.checkpoint import LoopState
from schemas.method import LayerPlan
from train_student import config as cfg
from train_student.checkpoint import CheckpointError, find_checkpoint, read_meta, restore_state, save_checkpoint
from train_student.data import DataError, DataSource, TrainItem, make_loader, open_source
from train_student.distributed import Dist, init_distributed, order_seed, sharded_grad_norms
from train_student.metrics import JsonlLog, environment
from train_student.reweight import LossReweighter
from train_student.scale import InertTerms, apply_calibration, calibrate, first_window
from train_student.setup import build_trainer
from train_student.step import MicroStepper, NonFiniteLossError

USER_ERRORS = (cfg.ConfigError, DataError, ShardError, CheckpointError, NonFiniteLossError, FileNotFoundError)


@dataclass
class Session:
    """Everything the loop touches."""

    config: cfg.TrainConfig
    run_dir: Path
    device: torch.device
    model: torch.nn.Module
    processor: object
    source: DataSource
    stepper: MicroStepper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    reweighter: LossReweighter | None
    generator: torch.Generator | None
    loop: LoopState
    total_steps: int
    logs: dict = field(default_factory=dict)
    pending: list = field(default_factory=list)
    saved_step: int = -1
    window_start: float = 0.0
    done: bool = False
    calibration: dict | None = None
    inert: InertTerms = field(default_factory=InertTerms)
    memory: PeakMemory | None = None
    """peak memory since training started (``peak_memory_gib`` of every metrics row: the largest rank's)."""
    dist: Dist = field(default_factory=Dist)
    window_skipped: int = 0
    """samples of the open window this rank skipped (--skip-missing)."""


def prepare_run_dir(out: str, rank: int = 0) -> Path:
    """Create the run directory and prove it is writable before any training."""
    run_dir = Path(out)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{rank}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise cfg.ConfigError(f"run directory {run_dir} is not writable ({err}); choose a writable --out") from err
    return run_dir


# ================================================================ setup
def setup(config: cfg.TrainConfig, *, resume: str | None = None) -> Session:
    # ---------------------------------------------------------------- processes and device
    dist, device = init_distributed(config.run)
    # ---------------------------------------------------------------- run directory, resume point, seeds
    run_dir = prepare_run_dir(config.run.out, dist.rank)
    checkpoint = find_checkpoint(run_dir, resume)
    meta, loop = read_meta(checkpoint, config.to_dict(), world_size=dist.world) if checkpoint else ({}, LoopState())
    if dist.main:
        cfg.save(config, run_dir / "config.yaml")
        with (run_dir / "environment.jsonl").open("a", encoding="utf-8") as handle:  # one line per start
            handle.write(json.dumps(environment(device, world=dist.world, step=loop.step)) + "\n")
    torch.manual_seed(config.run.seed)
    # ---------------------------------------------------------------- data (every check before training)
    student_dir = str(resolve_model(config.model.student))
    family = family_of(student_dir)
    num_layers = AutoConfig.from_pretrained(student_dir).get_text_config().num_hidden_layers
    try:
        plan = LayerPlan.for_model(num_layers, config.loss.mid_start, config.loss.mid_end)
    except ValueError as err:
        raise cfg.ConfigError(f"loss.mid_start/mid_end for {config.model.student}: {err}") from err
    source = open_source(config, student_dir=student_dir, family=family, num_layers=num_layers,
                         rank=dist.data_rank, world=dist.data_world)
    # ---------------------------------------------------------------- model (and the ablation's teacher)
    online = bool(config.model.online_teacher)
    model = load_model(checkpoint or student_dir, attn_implementation="eager" if online else "sdpa")
    if dist.parallel != "fsdp":  # fsdp moves the model shard by shard (build_trainer)
        model = model.to(device)
    teacher = None
    if online:
        from train_student.online import check_online_layout, load_online_teacher

        check_online_layout(str(resolve_model(config.model.online_teacher)), student_dir, source.shards[0].path,
                            source.joiner.tiling)
        teacher = load_online_teacher(config.model.online_teacher, student_family=family, plan=plan,
                                      mid_start=config.loss.mid_start, mid_end=config.loss.mid_end, device=device)
    # ---------------------------------------------------------------- method, optimizer, schedule
    o = config.optim
    total = sum(math.ceil(source.epoch_samples(e) / o.grad_accum) for e in range(o.epochs))
    parts = build_trainer(config, model, plan, device, total_steps=total, teacher=teacher, dist=dist)
    stepper, optimizer, scheduler = parts.stepper, parts.optimizer, parts.scheduler
    reweighter, generator, summary = parts.reweighter, parts.generator, parts.summary
    # ---------------------------------------------------------------- resume (the calibration before the reweighter)
    calibration = meta.get("calibration")
    if calibration:
        apply_calibration(calibration, stepper.weights, reweighter)
    if checkpoint:
        restore_state(checkpoint, optimizer=optimizer, scheduler=scheduler, reweighter=reweighter,
                      generator=generator, model=model, dist=dist)
    logs = {n: JsonlLog(run_dir / n, keep_bytes=loop.log_bytes[n]) for n in loop.log_bytes} if dist.main else {}
    session = Session(config=config, run_dir=run_dir, device=device, model=model,
                      processor=load_processor(student_dir), source=source, stepper=stepper, optimizer=optimizer,
                      scheduler=scheduler, reweighter=reweighter, generator=generator, loop=loop, total_steps=total,
                      saved_step=loop.step if checkpoint else -1, calibration=calibration, logs=logs, dist=dist)
    if dist.main:
        report_setup(session, plan, summary, checkpoint)
    return session


def report_setup(s: Session, plan: LayerPlan, model_summary: str, checkpoint: Path | None) -> None:
    c = s.config
    mode = ("SFT (CE only)" if c.loss.sft else f"terms {['ce', *c.terms]} (loss {c.loss.kind}, scale {c.loss.scale}), "
            f"AGP {'on' if c.method.agp else 'off'}, reweighting {'on' if c.method.reweight else 'off'}")
    source = f"ONLINE TEACHER {c.model.online_teacher} (ablation)" if c.model.online_teacher else \
        f"caches {c.data.caches}" if c.data.caches else "no cache"
    accum = c.optim.grad_accum
    balance = (f" (optim.grad_accum={accum} is not a multiple of the {s.dist.data_world} data-parallel ranks: "
               "some ranks idle in every window; use a multiple)" if accum % s.dist.data_world else "")
    print(f"train_student: {c.model.student} ({plan.num_layers} layers, capture {plan.layers(c.terms)}) on "
          f"{s.device} ({s.dist.describe()}{balance}); {mode}; {source}; {s.source.epoch_samples(0)} samples/epoch "
          f"x {c.optim.epochs} epoch(s), "
          f"{s.total_steps} optimizer steps; {model_summary}"
          + (f"; resuming {checkpoint} at step {s.loop.step}" if checkpoint else ""), file=sys.stderr)


# ================================================================ train
def window_end(s: Session) -> int:
    """End (exclusive) of the open window's epoch positions: ``grad_accum`` positions from its start."""
    return min(s.loop.position + s.config.optim.grad_accum, s.source.epoch_samples(s.loop.epoch))


def optimizer_step(s: Session, bar: tqdm) -> None:
    """Close the window (all ranks): one gather of its statistics and sample lines, NaN check, optimizer
    step (the gradient summed over the data-parallel ranks), logs, progress, periodic checkpoint. A
    window whose every sample was skipped only records them."""
    step = s.loop.step + 1
    local = {"lines": s.pending, "skipped": s.window_skipped, "memory_gib": s.memory.read_gib()}
    summary = s.stepper.finish_window(step, extra=local)
    extras = summary.pop("extra")
    s.pending, s.window_skipped = [], 0
    s.loop.position, s.loop.skipped = window_end(s), s.loop.skipped + sum(e["skipped"] for e in extras)
    lines = sorted((line for e in extras for line in e["lines"]), key=lambda line: line["index"])
    if not summary["samples"]:
        write_samples(s, s.loop.step, lines)
        return
    lr = s.scheduler.get_last_lr()[0]
    s.stepper.apply(s.optimizer, s.scheduler, max_grad_norm=s.config.optim.max_grad_norm)
    s.loop.step, s.loop.samples = step, s.loop.samples + summary["samples"]
    now = time.perf_counter()
    rate = summary["samples"] / max(now - s.window_start, 1e-9)
    s.window_start = now
    row = {"step": step, "epoch": s.loop.epoch, "lr": lr, **{k: v for k, v in summary.items() if k != "nonfinite_key"},
           "samples_per_s": rate, "peak_memory_gib": max(e["memory_gib"] for e in extras),
           **({"calibration": s.calibration} if step == 1 and s.calibration else {})}
    if s.dist.main:
        s.logs["metrics.jsonl"].write(row)
        s.inert.check(row)
    write_samples(s, step, lines)
    bar.update(1)
    bar.set_postfix(loss=f"{summary['loss']:.4f}", samples_s=f"{rate:.2f}")
    max_steps = s.config.run.max_steps
    s.done = max_steps is not None and step >= max_steps
    if s.config.run.save_every and step % s.config.run.save_every == 0 and not s.done:
        checkpoint(s)


def write_samples(s: Session, step: int, lines: list[dict]) -> None:
    if s.dist.main:
        for line in lines:
            s.logs["samples.jsonl"].write({"step": step, **line})


def checkpoint(s: Session) -> Path:
    if s.dist.main:
        s.loop.log_bytes = {name: log.size() for name, log in s.logs.items()}
    path = save_checkpoint(s.run_dir, model=s.model, processor=s.processor, optimizer=s.optimizer,
                           scheduler=s.scheduler, reweighter=s.reweighter, generator=s.generator, loop=s.loop,
                           config=s.config.to_dict(), keep_last=s.config.run.keep_last, calibration=s.calibration,
                           dist=s.dist)
    s.saved_step = s.loop.step
    return path


def calibrate_scale(s: Session) -> None:
    """``loss.scale=balanced``, fresh run: calibrate the lambdas on the first window's samples (which the
    loop then trains on with them; each rank measures its own, the sums are added) and apply them
    (train_student.scale)."""
    c, stepper = s.config, s.stepper
    loader = make_loader(s.source, epoch=s.loop.epoch, start=s.loop.position, num_workers=c.data.num_workers,
                         pin_memory=s.device.type == "cuda")
    end = window_end(s)
    items = first_window(takewhile(lambda item: item.index < end, loader), c.optim.grad_accum)
    norms = {} if s.dist.parallel != "fsdp" else {
        "grad_norms": sharded_grad_norms(s.dist, stepper.before_term_backward)}
    try:
        s.calibration = calibrate(stepper.forward, stepper.weights, stepper.params, items, c.loss,
                                  reduce=s.dist.sum_over_data if s.dist.data_world > 1 else None, **norms)
    except ValueError as err:
        raise cfg.ConfigError(str(err)) from err
    apply_calibration(s.calibration, stepper.weights, s.reweighter)
    if s.dist.main:
        lams = ", ".join(f"lam_{t}={v:.4g}" for t, v in s.calibration["lambdas"].items())
        print(f"train_student: loss.scale=balanced calibrated on {s.calibration['samples']} samples: {lams} "
              f"(ratios to CE {s.calibration['ratios']})", file=sys.stderr)


def take(s: Session, item: TrainItem) -> None:
    """One sample of the open window: its sample line, then its micro-step (or the skip count)."""
    s.pending.append({"epoch": s.loop.epoch, "index": item.index, "key": item.key,
                      **({"skipped": item.skipped} if item.skipped else {})})
    if item.skipped:
        s.window_skipped += 1
        return
    if s.generator is not None:  # the AGP order of a sample: the same for every world size
        s.generator.manual_seed(order_seed(s.config.run.seed, s.loop.epoch, item.index))
    s.stepper.micro_step(item)


def train(s: Session) -> None:
    c = s.config
    if c.loss.scale == "balanced" and c.terms and s.calibration is None:
        calibrate_scale(s)
    limit = min(s.total_steps, c.run.max_steps or s.total_steps)
    s.done = s.loop.epoch >= c.optim.epochs or (c.run.max_steps is not None and s.loop.step >= c.run.max_steps)
    progress = c.run.progress and s.dist.main
    with PeakMemory(s.device) as s.memory, tqdm(total=limit, initial=min(s.loop.step, limit), unit="step",
                                                 disable=not progress, dynamic_ncols=True, desc="training") as bar:
        while not s.done and s.loop.epoch < c.optim.epochs:
            s.window_start = time.perf_counter()
            loader = make_loader(s.source, epoch=s.loop.epoch, start=s.loop.position,
                                 num_workers=c.data.num_workers, pin_memory=s.device.type == "cuda")
            for item in loader:  # this rank's samples, in epoch order; every rank closes every window
                while not s.done and item.index >= window_end(s):
                    optimizer_step(s, bar)
                if s.done:
                    break
                take(s, item)
            while not s.done and s.loop.position < s.source.epoch_samples(s.loop.epoch):
                optimizer_step(s, bar)
            if s.loop.position >= s.source.epoch_samples(s.loop.epoch):
                s.loop.epoch, s.loop.position = s.loop.epoch + 1, 0


# ================================================================ cleanup
def cleanup(s: Session) -> None:
    final = checkpoint(s) if s.loop.step != s.saved_step else None
    for log in s.logs.values():
        log.close()
    state = "complete" if s.loop.epoch >= s.config.optim.epochs else f"stopped at epoch {s.loop.epoch}"
    if s.dist.main:
        print(f"train_student: {state} after {s.loop.step} optimizer steps, {s.loop.samples} samples trained, "
              f"{s.loop.skipped} skipped" + (" (missing from a cache, --skip-missing)" if s.loop.skipped else "")
              + (f"; checkpoint {final}" if final else "; nothing new to save"), file=sys.stderr)
    s.dist.close()


def memory_advice(config: cfg.TrainConfig) -> str:
    """What an out-of-memory run can switch on, from what its config leaves off."""
    options = []
    if config.terms and (config.method.agp or config.method.reweight) and config.method.bank_dtype != "bf16":
        options.append("--set method.bank_dtype=bf16")
    if not config.model.freeze_vision:
        options.append("--set model.freeze_vision=true")
    if config.terms and not config.model.recompute_attention:
        options.append("--set model.recompute_attention=true")
    if "r" not in config.terms and not config.model.gradient_checkpointing:  # otherwise nearly all layers are captured
        options.append("--set model.gradient_checkpointing=true")
    switch = f"switch on {' '.join(options)}" if options else "every memory option is already on; use a larger GPU"
    return (f"{switch}. Estimate the peak of a setting without a GPU: python -m train_student.bench "
            f"--estimate-memory --student-shape {config.model.student} (README: Fitting a 24 GB card; with "
            "several GPUs add --world-size N --parallel fsdp: run.parallel=fsdp shards weights, bank and optimizer "
            "state, README: Several GPUs and nodes). "
            "Earlier checkpoints are intact; re-running the command resumes from the last one.")


def stop(message: str) -> None:
    """Exit with ``message``; under torchrun the rank is named and the error recorded, so torchrun's
    failure summary shows it while it stops the other ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        message = message.replace("error:", f"error (rank {os.environ.get('RANK', '?')} of {world}):", 1)
        if os.environ.get("TORCHELASTIC_ERROR_FILE"):
            get_error_handler().record_exception(RuntimeError(message))
    sys.exit(message)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # DataLoader workers fork after tokenizer use
    args = cfg.build_parser().parse_args(argv)
    try:
        config = cfg.config_from_args(args)
        session = setup(config, resume=args.resume)
        train(session)
        cleanup(session)
    except torch.OutOfMemoryError as err:
        stop(f"error: out of memory ({str(err).splitlines()[0]}). To fit: {memory_advice(config)}")
    except torch.distributed.DistError as err:
        stop(f"error: a collective with the other ranks failed ({str(err).splitlines()[0]}): another rank "
             "died or did not answer within run.timeout_s; its own error names the cause")
    except USER_ERRORS as err:
        message = str(err)
        if "Original Traceback" in message:  # raised in a DataLoader worker: keep the worker's own message
            message = message.strip().splitlines()[-1].split(": ", 1)[-1]
        stop(f"error: {message}")
