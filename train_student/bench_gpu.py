"""The trainer's stages of ``make bench-gpu`` (``pipeline.measure.gpu`` runs them; one stage per call).

    python -m train_student.bench_gpu --stage train-1b --device cuda --out-dir D [--budget-s 150] [--tiny]
    python -m train_student.bench_gpu --stage train-8b --device cuda --out-dir D [--budget-s 90] [--tiny]

  train-1b  trainer at the InternVL3-1B student shape, 6 views: SFT, Drive-KD with and without AGP, the
            memory options, the online InternVL3-8B teacher (samples/s, peak GiB, the issue's ratios;
            train_student.bench)
  train-8b  trainer at the InternVL3-8B student shape: SFT, Drive-KD with and without AGP, all memory
            options on, micro-steps only (forward + backward, no optimizer step: fp32 weights, gradients
            and AdamW state of an 8B student need ~143 GiB). A mode whose predicted memory
            (``training_memory``) exceeds ``--memory-fraction`` (90%) of the device's is recorded as
            skipped_memory with the prediction: SFT and no-AGP need ~72 GiB before activations (they run
            on an H200, not on an 80 GB H100), AGP's gradient bank ~158 GiB (nowhere)

Writes ``D/<stage>_<gpu>.json`` (``pipeline.measure.gpu_common.stage_main``); exit status 1 when the stage
failed.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from transformers import AutoModelForImageTextToText

from pipeline.measure.gpu_common import Plan, StageRun, describe_device, stage_main
from pipeline.measure.results import GIB, PeakMemory
from pipeline.models.shapes import shape_config
from schemas.method import LayerPlan
from train_student import bench as train_bench
from train_student.setup import autocast_dtype, build_trainer
from train_student.step import vision_tower

LARGE_OPTIONS = train_bench.GPU_MEMORY_OPTIONS["drive_kd_agp_bf16_bank_frozen_vision_recompute_checkpointing"]
LARGE_MODES = ("sft", "drive_kd_no_agp", "drive_kd_agp")


def train_items(config, plan: Plan) -> list:
    """Four synthetic training samples of ``config`` (cached targets for its plan's layers)."""
    k = len(LayerPlan.for_model(config.get_text_config().num_hidden_layers).mid)
    question, answer = plan.train_text
    return train_bench.synthetic_items(config, n=4, views=plan.train_views, k=k, question=question, answer=answer)


def mode_overrides(plan: Plan, *overrides: dict) -> dict:
    """Config overrides of a mode, section by section, with the plan's grad_accum."""
    merged: dict = {}
    for override in (*overrides, {"optim": {"grad_accum": plan.grad_accum}} if plan.grad_accum else {}):
        for section, values in override.items():
            merged[section] = {**merged.get(section, {}), **values}
    return merged


# ---------------------------------------------------------------- train-1b
def online_mode(plan: Plan, device: torch.device, student_config, items) -> dict:
    """train_student.bench's online-teacher mode with the teacher built on the device (bf16 on CUDA)."""
    with torch.device(device):
        teacher = AutoModelForImageTextToText.from_config(
            shape_config(plan.teacher), attn_implementation="eager",
            dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    return train_bench.synthetic_mode("online_teacher", mode_overrides(plan, train_bench.MODES["online_teacher"][1]),
                                      student_config=student_config, items=items, device=device,
                                      warmup=plan.warmup, steps=plan.steps, teacher_model=teacher)


def stage_train_small(run: StageRun, plan: Plan, device: torch.device) -> dict:
    student_config = shape_config(plan.student)
    items = train_items(student_config, plan)
    for name, overrides in train_bench.cached_modes(True):
        run.run(name, train_bench.synthetic_mode, name, mode_overrides(plan, overrides), student_config=student_config,
                items=items, device=device, warmup=plan.warmup, steps=plan.steps)
    run.run("online_teacher", online_mode, plan, device, student_config, items)
    result = {"student": plan.student, "teacher": plan.teacher, "views": plan.train_views,
              "seq_len": statistics.mean(item.labels.numel() for item in items), "modes": run.parts}
    if all(run.parts.get(m, {}).get("status") == "ok" for m in train_bench.MODES):
        train_bench.summarise(result, device)
    return {key: value for key, value in result.items() if key != "modes"}


# ---------------------------------------------------------------- train-8b
def training_memory(student_config, config, device: torch.device) -> dict:
    """Memory the trainer holds for ``config`` (a resolved TrainConfig) before activations, GiB.

    Micro-steps without an optimizer step: fp32 weights 4N, gradients 4T, bf16 autocast copies of the
    trainable weights 2T (GPU), the gradient bank (rows x T x 2|4, + 4T) when AGP or reweighting is on.
    Training with optimizer steps: weights, gradients and bank, the AdamW state 8T and, in the step,
    the foreach implementation's temporaries 4T (the autocast copies are gone by then): 4N + 16T + bank.
    N, T: all and trainable parameters (vision tower frozen or not), counted on the meta device."""
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(student_config)
    n = sum(p.numel() for p in model.parameters())
    t = n - (sum(p.numel() for p in vision_tower(model).parameters()) if config.model.freeze_vision else 0)
    m = config.method
    rows = 1 + len(config.terms) if (m.agp or m.reweight) else 0
    bank = rows * t * (2 if m.bank_dtype == "bf16" else 4) + (4 * t if rows else 0)
    autocast = 2 * t if autocast_dtype(config.model.precision, device) is not None else 0
    micro = 4 * n + 4 * t + autocast + bank
    return {"parameters": n, "trainable": t, "weights_gib": 4 * n / GIB, "gradients_gib": 4 * t / GIB,
            "autocast_copies_gib": autocast / GIB, "bank_gib": bank / GIB, "micro_steps_gib": micro / GIB,
            "with_optimizer_step_gib": (4 * n + 16 * t + bank) / GIB}


def micro_steps_mode(name: str, overrides: dict, *, student_config, items, device, warmup: int, steps: int) -> dict:
    """``train_student.bench.synthetic_mode`` without the optimizer step: ``warmup`` untimed and ``steps``
    timed windows of grad_accum micro-steps (forward, backward, AGP), gradients accumulating."""
    config = train_bench.mode_config(name, overrides)
    with PeakMemory(device) as memory:
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForImageTextToText.from_config(student_config, attn_implementation="sdpa")
        plan = LayerPlan.for_model(student_config.get_text_config().num_hidden_layers, config.loss.mid_start,
                                   config.loss.mid_end)
        stepper = build_trainer(config, model, plan, device, total_steps=1).stepper
        accum = config.optim.grad_accum
        for window in range(warmup + steps):
            if window == warmup:
                train_bench.sync(device)
                start = time.perf_counter()
            for j in range(accum):
                stepper.micro_step(items[(window * accum + j) % len(items)])
            stepper.finish_window(window + 1)
        train_bench.sync(device)
        elapsed = time.perf_counter() - start
    return {"samples_per_s": steps * accum / elapsed, "peak_memory_gib": memory.read_gib(),
            "micro_steps_timed": steps * accum, "optimizer_step": False}


def stage_train_large(run: StageRun, plan: Plan, device: torch.device) -> dict:
    student_config = shape_config(plan.large_student)
    items = train_items(student_config, plan)
    total = describe_device(device)["total_memory_gib"]
    for name in LARGE_MODES:
        overrides = mode_overrides(plan, train_bench.MODES[name][1], LARGE_OPTIONS)
        predicted = training_memory(student_config, train_bench.mode_config(name, overrides), device)
        if predicted["micro_steps_gib"] > plan.memory_fraction * total:
            run.skip(name, "skipped_memory", f"predicted {predicted['micro_steps_gib']:.1f} GiB before activations "
                     f"> {plan.memory_fraction:.0%} of the device's {total:.1f} GiB (--memory-fraction)",
                     predicted_memory=predicted)
            continue
        run.run(name, micro_steps_mode, name, overrides, student_config=student_config, items=items, device=device,
                warmup=plan.warmup, steps=plan.steps)
        run.parts[name]["predicted_memory"] = predicted
    return {"student": plan.large_student, "views": plan.train_views, "options": LARGE_OPTIONS,
            "seq_len": statistics.mean(item.labels.numel() for item in items),
            "why_micro_steps_only": "fp32 weights, gradients and AdamW state (16 bytes per trainable parameter, "
                                    "+4 for the foreach step) of an 8B student exceed one 80 or 141 GB GPU"}


STAGES = {"train-1b": stage_train_small, "train-8b": stage_train_large}


def main(argv: list[str] | None = None) -> int:
    return stage_main("train_student.bench_gpu", STAGES, argv, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
