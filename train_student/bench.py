"""Benchmark of the student trainer: samples/s and peak memory per training mode.

    python -m train_student.bench                     # CPU: tiny models, generated 6-view data, a real cache
    python -m train_student.bench --synthetic         # GPU default: InternVL3-1B-shape student,
                                                      # InternVL3-8B-shape teacher, synthetic 6-view samples
    python -m train_student.bench --estimate-memory   # no GPU needed: estimated peak GPU memory per option
    python -m train_student.bench --estimate-memory --world-size 1 2 4 8 --parallel ddp fsdp   # per GPU

Modes: ``sft`` (CE only), ``drive_kd_agp`` (cached maps, AGP + reweighting: the default),
``drive_kd_no_agp`` (cached maps, plain weighted sum in one backward), ``online_teacher`` (the
reference approach: teacher in the loop, eager attention everywhere, per-parameter AGP). With a GPU
(and in the estimate) also the memory options of ``GPU_MEMORY_OPTIONS``: bf16 gradient bank, frozen
vision tower, recomputed captured attention, gradient checkpointing.

The CPU run drives the real CLI (``python -m train_student``, one process per mode, data loading
included; peak memory = the process's peak RSS). The synthetic run times the trainer's micro-step
and optimizer step in-process on random-initialised real-shape models with cached targets
synthesised at the right shapes (speed and memory do not depend on weight or token values; peak
memory = CUDA max allocated, model, optimizer and gradient bank included). Writes
``benchmarks/results/train_<device>.json``. Not a test: nothing asserts timings.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

from pipeline.attention.capture import captured_attention
from pipeline.data.demo import vocabulary_corpus
from pipeline.evaluation.efficiency import synthetic_inputs
from pipeline.measure.memory_trace import METHOD
from pipeline.measure.results import GIB, PeakMemory, device_name, write_results
from pipeline.models.shapes import shape_config
from pipeline.models.tiny import build_tiny
from schemas.method import CAPABILITIES, ROLES, LayerPlan
from train_student import config as cfg
from train_student.data import TrainItem
from train_student.memory import estimate_peak, per_gpu
from train_student.metrics import read_jsonl
from train_student.online import OnlineTeacher
from train_student.setup import build_trainer

MODES = {  # name -> (CLI flags, config overrides)
    "sft": (["--sft"], {"loss": {"sft": True}}),
    "drive_kd_agp": ([], {}),
    "drive_kd_no_agp": (["--no-agp"], {"method": {"agp": False}}),
    "online_teacher": (["--online-teacher"], {"model": {"online_teacher": "in-memory"}}),
}
GPU_MEMORY_OPTIONS = {
    "drive_kd_agp_bf16_bank": {"method": {"bank_dtype": "bf16"}},
    "drive_kd_agp_bf16_bank_frozen_vision": {"method": {"bank_dtype": "bf16"}, "model": {"freeze_vision": True}},
    "drive_kd_agp_bf16_bank_frozen_vision_recompute": {"method": {"bank_dtype": "bf16"},
                                                       "model": {"freeze_vision": True, "recompute_attention": True}},
    "drive_kd_agp_bf16_bank_frozen_vision_recompute_checkpointing": {
        "method": {"bank_dtype": "bf16"},
        "model": {"freeze_vision": True, "recompute_attention": True, "gradient_checkpointing": True}},
}


# ---------------------------------------------------------------- CPU: the real CLI on tiny models
def tiny_workdir(root: Path, samples: int) -> dict[str, str]:
    """Tiny InternVL student and teacher, generated 6-view QA shards and the teacher's cache."""
    from pipeline.data.demo import generate
    from pipeline.data.ingest import ingest

    generate(root / "demo", samples=samples, seed=7, views="6")
    ingest(root / "demo" / "qa.json", root / "demo", root / "shards", shard_size=max(1, samples // 2))
    paths = {"student": str(build_tiny("internvl", "student", root / "student", corpus=vocabulary_corpus())),
             "teacher": str(build_tiny("internvl", "teacher", root / "teacher", corpus=vocabulary_corpus())),
             "data": str(root / "shards"), "cache": str(root / "cache")}
    subprocess.run([sys.executable, "-m", "cache_teacher", "--teacher", paths["teacher"], "--data", paths["data"],
                    "--out", paths["cache"], "--workers", "0"], check=True, capture_output=True)
    return paths


def cli_mode(name: str, paths: dict, root: Path, *, warmup: int, steps: int) -> dict:
    flags, _ = MODES[name]
    flags = [f if f != "--online-teacher" else f"--online-teacher={paths['teacher']}" for f in flags]
    cache = [] if name in ("sft", "online_teacher") else ["--cache", paths["cache"]]
    run = root / f"run-{name}"
    subprocess.run([sys.executable, "-m", "train_student", "--student", paths["student"], "--data", paths["data"],
                    *cache, "--out", str(run), *flags, "--max-steps", str(warmup + steps), "--set", "run.progress=false",
                    "--set", "run.save_every=0"], check=True, capture_output=True,
                   env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    rows = read_jsonl(run / "metrics.jsonl")[warmup:]
    seconds = sum(r["samples"] / r["samples_per_s"] for r in rows)
    return {"samples_per_s": sum(r["samples"] for r in rows) / seconds, "peak_memory_gib": rows[-1]["peak_memory_gib"],
            "optimizer_steps_timed": len(rows)}


# ---------------------------------------------------------------- synthetic: real shapes in memory
def synthetic_items(config, *, n: int, views: int, k: int, question: int = 180, answer: int = 40) -> list[TrainItem]:
    """Samples in a real prompt's layout (``pipeline.efficiency.synthetic_inputs``: InternVL or Qwen2.5-VL):
    text, ``views`` image spans, question, answer; cached targets with the stored shapes (tv blocks
    [n_text, n_vision], mid [k, S*(S+1)/2])."""
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        inputs = synthetic_inputs(config, views=views, generator=g, text_tokens=(20, question, answer))
        input_ids = inputs["input_ids"][0]
        is_vision = input_ids == config.image_token_id
        s, n_vision = len(input_ids), int(is_vision.sum())
        labels = torch.full_like(input_ids, -100)
        labels[s - answer:] = input_ids[s - answer:]
        targets = {"perception": torch.rand(s - n_vision, n_vision, generator=g) / n_vision,
                   "planning": torch.rand(s - n_vision, n_vision, generator=g) / n_vision,
                   "reasoning": torch.rand(k, s * (s + 1) // 2, generator=g) * (2 / s)}
        items.append(TrainItem(key=f"synthetic-{i}", index=i, capability=CAPABILITIES[i % 3],
                               inputs=inputs, labels=labels, is_vision=is_vision, answer_start=s - answer,
                               targets=targets))
    return items


def mode_config(name: str, overrides: dict) -> cfg.TrainConfig:
    data = {"data": {"shards": "synthetic", "caches": {} if name in ("sft", "online_teacher") else
                     {r: "synthetic" for r in ROLES}}, "model": {"student": "synthetic"}, "run": {"out": "-"}}
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    return cfg.resolve(cfg.from_dict(data))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_mode(name: str, overrides: dict, *, student_config, items, device, warmup: int, steps: int,
                   teacher_model=None) -> dict:
    config = mode_config(name, overrides)
    with PeakMemory(device) as memory:
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForImageTextToText.from_config(
                student_config, attn_implementation="eager" if teacher_model is not None else "sdpa")
        loss = config.loss
        plan = LayerPlan.for_model(student_config.get_text_config().num_hidden_layers, loss.mid_start, loss.mid_end)
        teacher = None
        if teacher_model is not None:
            teacher = OnlineTeacher(teacher_model, plan=plan, mid_start=loss.mid_start, mid_end=loss.mid_end)
        parts = build_trainer(config, model, plan, device, total_steps=warmup + steps, teacher=teacher)
        stepper, optimizer, scheduler = parts.stepper, parts.optimizer, parts.scheduler
        accum = config.optim.grad_accum
        for window in range(warmup + steps):
            if window == warmup:
                sync(device)
                start = time.perf_counter()
            for j in range(accum):
                stepper.micro_step(items[(window * accum + j) % len(items)])
            stepper.finish_window(window + 1)
            stepper.apply(optimizer, scheduler)
        sync(device)
        elapsed = time.perf_counter() - start
    del model, stepper, optimizer, parts
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"samples_per_s": steps * accum / elapsed, "peak_memory_gib": memory.read_gib(),
            "optimizer_steps_timed": steps}


def cached_modes(with_memory_options: bool) -> list[tuple[str, dict]]:
    """(name, config overrides) of the modes without a teacher in the loop."""
    extra = GPU_MEMORY_OPTIONS if with_memory_options else {}
    return [*((n, o) for n, (_, o) in MODES.items() if n != "online_teacher"), *extra.items()]


def run_synthetic(args, device: torch.device) -> dict:
    student_config, teacher_config = shape_config(args.student_shape), shape_config(args.teacher_shape)
    k = len(LayerPlan.for_model(student_config.get_text_config().num_hidden_layers).mid)
    items = synthetic_items(student_config, n=4, views=args.views, k=k)
    result = {"student": args.student_shape, "teacher": args.teacher_shape, "views": args.views,
              "seq_len": statistics.mean(it.labels.numel() for it in items), "modes": {}}
    for name, overrides in cached_modes(device.type == "cuda"):
        result["modes"][name] = synthetic_mode(name, overrides, student_config=student_config, items=items,
                                               device=device, warmup=args.warmup, steps=args.steps)
        print(name, result["modes"][name], file=sys.stderr)
    with torch.device(device):
        teacher = AutoModelForImageTextToText.from_config(
            teacher_config, attn_implementation="eager",
            dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    result["modes"]["online_teacher"] = synthetic_mode("online_teacher", MODES["online_teacher"][1],
                                                       student_config=student_config, items=items, device=device,
                                                       warmup=args.warmup, steps=args.steps, teacher_model=teacher)
    return result


def run_estimate(args) -> dict:
    """Peak GPU memory of every cached mode and memory option (or ``args.modes``), traced with fake tensors on
    the CPU (``train_student.memory``): the default config (grad_accum 4) with bf16 autocast as on a GPU; per
    GPU for each of ``args.world_size`` under each of ``args.parallel`` (``train_student.memory.per_gpu``)."""
    student_config = shape_config(args.student_shape)
    k = len(LayerPlan.for_model(student_config.get_text_config().num_hidden_layers).mid)
    items = synthetic_items(student_config, n=2, views=args.views, k=k)
    result = {"student": args.student_shape, "views": args.views, "seq_len": items[0].labels.numel(),
              "method": f"{METHOD}; the trainer's own micro-steps and optimizer steps (train_student.memory); "
                        "per GPU: ddp = one process (+ one all-reduce bucket in the plain mode), fsdp = the "
                        "traced parts with weights, bank, optimizer state and gradients as 1/world shards plus "
                        "one unsharded copy of the weights (train_student.memory.per_gpu)",
              "modes": {}, "per_gpu": {}}
    for name, overrides in cached_modes(True):
        if args.modes and name not in args.modes:
            continue
        overrides = {**overrides, "model": {**overrides.get("model", {}), "precision": "bf16"}}
        config = mode_config(name, overrides)
        estimate = result["modes"][name] = estimate_peak(student_config, config, items)
        plain = not (config.method.agp or config.method.reweight)
        result["per_gpu"][name] = {parallel: {str(world): per_gpu(estimate, world_size=world, parallel=parallel,
                                                                  plain=plain)
                                              for world in args.world_size if parallel != "none" or world == 1}
                                   for parallel in args.parallel}
        print(name, estimate, result["per_gpu"][name], file=sys.stderr)
    result["under_24gb"] = {name: m["peak_gib"] < 24 for name, m in result["modes"].items()}
    return result


def captured_layer_memory(*, heads: int = 14, seq: int = 1800, dim: int = 64) -> dict:
    """Bytes autograd keeps for backward through one captured attention layer (InternVL3-1B heads, a
    6-view sequence): probabilities stored by plain autograd vs recomputed in backward
    (pipeline.capture). Counted with saved-tensor hooks, so the figure is exact and device-independent."""
    def stored(q, k, v, mask, scaling):
        probs = torch.softmax((q @ k.transpose(-1, -2) * scaling).masked_fill(~mask, -1e30), dim=-1)
        return probs @ v, probs.mean(dim=1)

    mask = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None]
    figures = {"heads": heads, "seq_len": seq, "head_dim": dim}
    for name, fn in (("recomputed", captured_attention), ("stored", stored)):
        q, k, v = (torch.randn(1, heads, seq, dim, requires_grad=True) for _ in range(3))
        saved: dict[tuple, int] = {}

        def pack(tensor):
            saved[(tensor.data_ptr(), tensor.shape)] = tensor.numel() * tensor.element_size()  # noqa: B023 (used inside the loop)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            fn(q, k, v, mask, dim ** -0.5)
        figures[f"{name}_saved_gib"] = sum(saved.values()) / GIB
    return figures


def summarise(result: dict, device: torch.device) -> None:
    modes = result["modes"]
    rate = {name: m["samples_per_s"] for name, m in modes.items()}
    result["ratios"] = {"drive_kd_agp_vs_online_samples_per_s": rate["drive_kd_agp"] / rate["online_teacher"],
                        "drive_kd_agp_step_cost_vs_sft": rate["sft"] / rate["drive_kd_agp"],
                        "drive_kd_no_agp_step_cost_vs_sft": rate["sft"] / rate["drive_kd_no_agp"]}
    result["targets"] = {"cached_at_least_4x_online": result["ratios"]["drive_kd_agp_vs_online_samples_per_s"] >= 4,
                         "agp_at_most_2.5x_sft": result["ratios"]["drive_kd_agp_step_cost_vs_sft"] <= 2.5}
    if device.type == "cuda":
        result["targets"]["under_24gb"] = {name: m["peak_memory_gib"] < 24 for name, m in modes.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m train_student.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="results JSON (default benchmarks/results/train_<device>.json)")
    p.add_argument("--synthetic", action="store_true", help="in-memory real-shape models (default on a GPU)")
    p.add_argument("--estimate-memory", action="store_true",
                   help="no device needed: estimate the peak GPU memory of each cached mode and memory option "
                        "at --student-shape with fake tensors (train_student.memory); writes "
                        "benchmarks/results/train_memory-estimate_<student>.json")
    p.add_argument("--world-size", type=int, nargs="+", default=[1], metavar="N",
                   help="--estimate-memory: GPUs to give the per-GPU peak for (e.g. 1 2 4 8)")
    p.add_argument("--parallel", nargs="+", default=["none"], choices=cfg.PARALLEL_MODES,
                   help="--estimate-memory: run.parallel modes of the per-GPU peak (ddp, fsdp; none: one process)")
    p.add_argument("--modes", nargs="+", metavar="MODE",
                   help="--estimate-memory: only these modes/options (default: all, see GPU_MEMORY_OPTIONS)")
    p.add_argument("--student-shape", default="InternVL3-1B", help="real-size name or model directory (synthetic)")
    p.add_argument("--teacher-shape", default="InternVL3-8B", help="real-size name or model directory (synthetic)")
    p.add_argument("--views", type=int, default=6, help="camera views per synthetic sample")
    p.add_argument("--warmup", type=int, default=1, help="optimizer steps not timed")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps timed (4 samples each)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {"device": device_name(), "cpus": os.cpu_count(), "torch": torch.__version__,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "command": "python -m train_student.bench " + " ".join(argv if argv is not None else sys.argv[1:])}
    if args.estimate_memory:
        result.update(run_estimate(args))
        name = Path(args.student_shape).name
        write_results(result, "train", args.out or f"benchmarks/results/train_memory-estimate_{name}.json")
        return
    if args.synthetic or device.type == "cuda":
        result.update(run_synthetic(args, device))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            paths = tiny_workdir(root, 4 * (args.warmup + args.steps))
            result.update({"student": "tiny internvl student (4 layers)", "teacher": "tiny internvl teacher (6 layers)",
                           "views": 6, "pipeline": "python -m train_student, 2 DataLoader workers", "modes": {}})
            for name in MODES:
                result["modes"][name] = cli_mode(name, paths, root, warmup=args.warmup, steps=args.steps)
                print(name, result["modes"][name], file=sys.stderr)
    summarise(result, device)
    result["captured_layer_saved_for_backward"] = captured_layer_memory()
    write_results(result, "train", args.out)


if __name__ == "__main__":
    main()
