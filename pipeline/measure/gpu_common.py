"""What the stages of ``make bench-gpu`` share: the plan, device naming, the file header, the part-budget
guard and the stage command line.

``pipeline.measure.gpu`` (the run) starts each stage as its own process, ``python -m MODULE --stage NAME``,
with MODULE the job that owns the code the stage measures (pipeline imports neither job):

    cache_teacher.bench_gpu       cache-forward, cache-encode
    train_student.bench_gpu       train-1b, train-8b
    pipeline.measure.gpu_stages   efficiency

Each of those modules calls ``stage_main`` with its stage functions; ``stage_main`` parses the stage's
command line, builds the plan, runs the stage function under a ``StageRun`` and writes
``OUT_DIR/<stage>_<gpu>.json``: after every part with status ``running`` (what a killed stage leaves),
at the end with the stage's status. The exit status is 1 when the stage failed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import transformers
from transformers import InternVLConfig

from pipeline.measure.results import GIB

FORMAT, VERSION = "drive-kd/bench-gpu", 2
BUDGETS = {"cache-forward": 75.0, "train-1b": 150.0, "train-8b": 90.0, "efficiency": 120.0, "cache-encode": 60.0}
"""each stage's time budget, seconds (the run's ``--stage-budget NAME=S`` changes one)."""
ERROR_CHARS = 2000


@dataclass(frozen=True)
class Plan:
    """What each stage measures: real-size names (``real_config``) or, with --tiny, tiny model folders."""

    teacher: str
    student: str
    large_student: str
    forward_views: tuple[int, ...] = (1, 6)
    forward_samples: int = 5
    """forwards per view count and attention mode; the first is a warm-up."""
    train_views: int = 6
    train_text: tuple[int, int] = (180, 40)
    """question and answer tokens of a synthetic training sample (train_student.bench.synthetic_items)."""
    grad_accum: int | None = None
    """micro-steps per optimizer step; None: the trainer's default (4)."""
    warmup: int = 1
    steps: int = 2
    """windows of grad_accum micro-steps (each closed by an optimizer step in train-1b) untimed / timed."""
    deploy: tuple[str, str] = ("InternVL3-1B", "InternVL3-8B")
    """the models of the efficiency stage (real-size names or model folders with a processor)."""
    efficiency_views: int = 6
    prompts: int = 8
    max_new_tokens: int = 64
    encode_size: int = 1800
    encode_maps: tuple[int, ...] = (23, 27)
    encode_views: int = 6
    memory_fraction: float = 0.9
    """train-8b runs a mode only when its predicted memory is at most this fraction of the device's."""


REAL_PLAN = Plan(teacher="InternVL3-8B", student="InternVL3-1B", large_student="InternVL3-8B")


def tiny_config(layers: int) -> InternVLConfig:
    """A very small InternVL config (one 16-wide vision layer, 4 tokens per 32-px view, 32-wide decoder)."""
    vision = dict(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32, image_size=32,
                  patch_size=8)
    text = dict(model_type="qwen2", num_hidden_layers=layers, hidden_size=32, num_attention_heads=2,
                num_key_value_heads=1, intermediate_size=64, vocab_size=320, max_position_embeddings=4096)
    return InternVLConfig(vision_config=vision, text_config=text, image_token_id=319, image_seq_length=4,
                          downsample_ratio=0.5, tie_word_embeddings=True)


def tiny_plan(root: Path, *, deploy: bool = True) -> Plan:
    """Very small configs saved under ``root`` for every stage but efficiency, which needs a processor:
    the tiny InternVL student of ``pipeline.models.tiny`` (both roles), built only with ``deploy``."""
    for name, layers in (("teacher", 4), ("student", 3)):
        tiny_config(layers).save_pretrained(root / name)
    plan = Plan(teacher=str(root / "teacher"), student=str(root / "student"), large_student=str(root / "teacher"),
                forward_samples=2, train_views=1, train_text=(16, 8), grad_accum=1, warmup=0, steps=1,
                efficiency_views=1, prompts=1, max_new_tokens=3, encode_size=96)
    if deploy:
        from pipeline.data.demo import vocabulary_corpus
        from pipeline.models.tiny import build_tiny

        model = str(build_tiny("internvl", "student", root / "deploy", corpus=vocabulary_corpus()))
        plan = replace(plan, deploy=(model, model))
    return plan


# ---------------------------------------------------------------- the device and the file header
def device_tag(name: str) -> str:
    """File-name form of a device name: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def describe_device(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"name": props.name, "total_memory_gib": props.total_memory / GIB,
                "capability": f"{props.major}.{props.minor}"}
    return {"name": f"cpu {platform.processor() or platform.machine()}",
            "total_memory_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, "cpus": os.cpu_count()}


def stage_threads(device: torch.device, tiny: bool) -> int:
    """Torch threads of a stage: one for tiny shapes on the CPU (tiny ops run ~10x faster on one thread of a
    shared CPU), else torch's default."""
    return 1 if tiny and device.type == "cpu" else torch.get_num_threads()


def header(device: torch.device, *, tiny: bool, command: str, run_command: str | None = None) -> dict:
    """The fields every file starts with: format, the device, versions, the command (and the run's)."""
    info = describe_device(device)
    head = {"format": FORMAT, "version": VERSION, "device": info,
            "device_tag": device_tag(info["name"]) + ("-tiny" if tiny else ""), "torch": torch.__version__,
            "transformers": transformers.__version__, "cuda": torch.version.cuda,
            "torch_threads": stage_threads(device, tiny), "tiny": tiny, "command": command}
    if run_command:
        head["run_command"] = run_command
    return {**head, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def resolve_device(parser: argparse.ArgumentParser, name: str | None, tiny: bool) -> torch.device:
    """``--device`` (default cuda; cpu when no GPU is visible and --tiny), refusing what cannot run."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() or not tiny else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device is visible to torch here; `--device cpu --tiny` checks the code paths on the CPU")
    if device.type == "cpu" and not tiny:
        parser.error("real-size models on the CPU would take hours; add --tiny (code paths only) or run on a GPU")
    return device


def write_json(path: Path, data: dict) -> None:
    """``data`` as indented JSON, replacing ``path`` atomically (a killed writer leaves the old file whole)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:ERROR_CHARS]


def free_memory(device: torch.device) -> None:
    """Release what the last part left on the GPU (reference cycles, the allocator's cache); a full
    collection costs ~0.6 s, so on the CPU (tiny shapes) nothing is done."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- the budget guard
class StageRun:
    """One stage's parts (``parts[name]``: figures with a ``status``) under its time budget.

    ``checkpoint(parts)``, when given, is called after every part (run, skipped or failed)."""

    def __init__(self, budget_s: float, device: torch.device,
                 checkpoint: Callable[[dict], None] | None = None):
        self.deadline, self.device, self.checkpoint = time.monotonic() + budget_s, device, checkpoint
        self.longest, self.parts = 0.0, {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def saved(self) -> None:
        if self.checkpoint is not None:
            self.checkpoint(self.parts)

    def skip(self, name: str, status: str, reason: str, **figures) -> None:
        self.parts[name] = {"status": status, "reason": reason, **figures}
        self.saved()

    def run(self, name: str, fn: Callable[..., dict], *args, **kwargs) -> dict | None:
        """``fn(*args, **kwargs)`` as part ``name`` if the time left covers the longest part so far;
        its figures, or None when it was skipped or raised (recorded with the error)."""
        left = self.left()
        if left <= 0 or left < self.longest:
            self.skip(name, "skipped_time", f"{max(left, 0):.0f} s left of the stage's budget; the longest part "
                      f"so far took {self.longest:.0f} s")
            return None
        start = time.monotonic()
        try:
            figures = fn(*args, **kwargs)
            self.parts[name] = {"status": "ok", **figures}
        except Exception as err:  # recorded in the results; the run goes on with the next part
            figures = None
            self.parts[name] = {"status": "failed", "error": error_text(err)}
        free_memory(self.device)
        self.longest = max(self.longest, time.monotonic() - start)
        self.parts[name]["wall_s"] = time.monotonic() - start
        self.saved()
        return figures

    def status(self) -> str:
        states = {part["status"] for part in self.parts.values()}
        if "failed" in states:
            return "failed"
        if len(states) == 1 and states != {"ok"}:  # every part skipped (or not available) for the same reason
            return states.pop()
        return "ok" if states <= {"ok"} else "partial"


# ---------------------------------------------------------------- one stage's command line
StageFunction = Callable[[StageRun, Plan, torch.device], dict]


def stage_parser(module: str, stages: dict[str, StageFunction], doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", required=True, choices=list(stages), help="the stage to run")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default cuda; cpu needs --tiny)")
    p.add_argument("--tiny", action="store_true",
                   help="tiny models and counts (one CPU thread on the CPU): checks the stage's code path")
    p.add_argument("--out-dir", default="benchmarks/results", help="where the JSON file goes (benchmarks/results)")
    p.add_argument("--budget-s", type=float, help="the stage's time budget (default: its budget in `make bench-gpu`)")
    p.add_argument("--memory-fraction", type=float, default=Plan.memory_fraction,
                   help="train-8b: run a mode only if its predicted memory is at most this fraction of the device's")
    p.add_argument("--run-command", help="the command of the run this stage is part of (recorded in the file)")
    return p


def stage_main(module: str, stages: dict[str, StageFunction], argv: list[str] | None = None,
               doc: str | None = None) -> int:
    """The command line of ``python -m MODULE --stage NAME``: runs ``stages[NAME]`` and writes its file."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = stage_parser(module, stages, doc)
    args = parser.parse_args(argv)
    device = resolve_device(parser, args.device, args.tiny)
    budget = BUDGETS[args.stage] if args.budget_s is None else args.budget_s
    start = time.monotonic()
    own = argv[:]
    if "--run-command" in own:  # the file's command reruns this stage alone
        at = own.index("--run-command")
        del own[at:at + 2]
    own = [arg for arg in own if not arg.startswith("--run-command=")]
    threads = torch.get_num_threads()
    torch.set_num_threads(stage_threads(device, args.tiny))  # restored below
    head = {**header(device, tiny=args.tiny, command=shlex.join(["python", "-m", module, *own]),
                     run_command=args.run_command), "stage": args.stage, "budget_s": budget}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.stage}_{head['device_tag']}.json"

    def checkpoint(parts: dict) -> None:
        write_json(path, {**head, "status": "running", "parts": parts, "wall_s": time.monotonic() - start})

    run = StageRun(budget, device, checkpoint)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            plan = REAL_PLAN if not args.tiny else tiny_plan(Path(tmp), deploy=args.stage == "efficiency")
            figures = stages[args.stage](run, replace(plan, memory_fraction=args.memory_fraction), device)
        record = {"status": run.status(), **figures}
    except Exception as err:  # recorded in the results; the run's next stage still runs
        record = {"status": "failed", "error": error_text(err)}
    finally:
        torch.set_num_threads(threads)
    free_memory(device)
    write_json(path, {**head, **record, "parts": run.parts, "wall_s": time.monotonic() - start})
    print(f"{args.stage}: {record['status']} ({time.monotonic() - start:.0f} s) -> {path}", file=sys.stderr)
    return int(record["status"] == "failed")
