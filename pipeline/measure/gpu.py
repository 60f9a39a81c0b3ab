"""Every GPU measurement of the project in one call, within 9 minutes on one H100/H200 (``make bench-gpu``).

    python -m pipeline.measure.gpu                          # all stages, real shapes, on the CUDA device
    python -m pipeline.measure.gpu --stages train-1b efficiency --out-dir /tmp/results
    python -m pipeline.measure.gpu --device cpu --tiny      # every stage at tiny shapes (checks the code paths)

Models are random-initialised from transformers configs with the published shapes
(``pipeline.models.shapes.real_config``); speed and memory do not depend on weight values. Stages, in
order, each with a time budget (seconds, ``--stage-budget NAME=S`` to change one), each run as its own
process by the job that owns the code it measures (pipeline imports neither job):

  cache-forward  75  InternVL3-8B teacher, bf16, 1 and 6 views: the cache job's forward with the plan's
                     layers captured vs eager ``output_attentions`` (samples/s, median s, peak GiB), and
                     the forward's FLOPs beside the achieved TFLOP/s  [python -m cache_teacher.bench_gpu]
  train-1b      150  trainer at the InternVL3-1B student shape, 6 views: SFT, Drive-KD with and without
                     AGP, the memory options, the online InternVL3-8B teacher (samples/s, peak GiB,
                     the issue's ratios)  [python -m train_student.bench_gpu]
  train-8b       90  trainer at the InternVL3-8B student shape: SFT, Drive-KD with and without AGP, all
                     memory options on, micro-steps only (forward + backward, no optimizer step: fp32
                     weights, gradients and AdamW state of an 8B student need ~143 GiB). A mode whose
                     predicted memory (``training_memory``) exceeds 90% of the device's is recorded as
                     skipped_memory with the prediction: SFT and no-AGP need ~72 GiB before activations
                     (they run on an H200, not on an 80 GB H100), AGP's gradient bank ~158 GiB (nowhere)
                     [python -m train_student.bench_gpu]
  efficiency    120  deployment metrics of the 1B and 8B shapes, 6 views, batch 1, 8 prompts x 64 new
                     tokens: tokens/s, TTFT, peak GiB  [python -m pipeline.measure.gpu_stages]
  cache-encode   60  the cache job's encode stage on the device at S = 1800, 23 and 27 maps, 6 views
                     (cache_teacher.bench.encode_stage_figures; "not_available" in a build without it)
                     [python -m cache_teacher.bench_gpu]

Each stage runs alone: ``python -m MODULE --stage NAME --device D --out-dir OUT --budget-s S [--tiny]``
(what this run starts; the same command reruns one stage).

Budget guard. The run has ``--budget-s`` (540 s). A stage starts only when the run's time left covers
its budget; inside a stage, a part (one mode, one view count) starts only when the stage's time left
covers the longest part so far. What does not start is recorded as ``skipped_time``. A part that raises
(e.g. CUDA out of memory) is recorded with its error and the others still run. A stage process that is
still running at its budget plus ``--margin-s`` (30 s: start-up, a part that overran) is killed and
recorded as ``timed_out`` with the parts it had finished and the tail of its log; a stage process that
ends without its result (a crash) is recorded as failed with its exit status and log tail. The other
stages still run; the exit status is 1 when any stage failed or timed out. A run ends within its budget
plus one margin.

Where the 9 minutes come from (H100 SXM: 989 dense bf16 TFLOP/s; at 40% of it, ~400 TFLOP/s;
``forward_flops`` counts them). One 6-view InternVL3-8B forward (S = 1734) is 30 TFLOP (decoder
weights 2 x 6.5B x S = 22.6, attention 1.2, lm_head 1.9, vision 6 tiles x 0.72): ~0.08 s, so the
20 forwards of cache-forward take seconds and the 8B build and first kernels ~20 s. A 1B-student
sample is 6.3 TFLOP forward (4.3 of it the vision tower): SFT ~19 TFLOP per micro-step (forward +
backward), AGP ~57 (one backward per term), the online teacher +30; 12 micro-steps per mode, 8 modes,
a model build each (3-15 s): ~80 s. The 8B student: ~105 TFLOP per SFT micro-step with checkpointing,
12 micro-steps per mode (~3 s), two 8B builds: ~30 s. Generation is launch-bound at batch 1 (~20-30
ms per token): 9 calls x 64 tokens per model, ~60 s for both. Expected ~4-5 min; the budgets add up
to 495 s, plus ~5-10 s of start-up per stage process (imports, CUDA), under 540 s.

Writes ``OUT_DIR/<stage>_<gpu>.json`` per stage (by the stage; by this run for a stage that was not
started, timed out or left no result), ``OUT_DIR/logs/<stage>_<gpu>.log`` (the stage's output) and
``OUT_DIR/bench-gpu_<gpu>.json`` (the summary), <gpu> the device name in lower case with dashes (e.g.
nvidia-h200; ``-tiny`` appended with --tiny). Each file names the device, torch, transformers and CUDA
versions and the command (a stage's file: the stage's own command and, as run_command, this run's).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline.measure.gpu_common import BUDGETS, Plan, header, resolve_device, write_json

TOTAL_BUDGET_S = 540
MARGIN_S = 30.0
LOG_TAIL = 3000
STAGES: dict[str, tuple[str, float]] = {
    "cache-forward": ("cache_teacher.bench_gpu", BUDGETS["cache-forward"]),
    "train-1b": ("train_student.bench_gpu", BUDGETS["train-1b"]),
    "train-8b": ("train_student.bench_gpu", BUDGETS["train-8b"]),
    "efficiency": ("pipeline.measure.gpu_stages", BUDGETS["efficiency"]),
    "cache-encode": ("cache_teacher.bench_gpu", BUDGETS["cache-encode"]),
}
"""stage -> (the module that runs it, its default budget in seconds)."""


def stage_args(name: str, args: argparse.Namespace) -> list[str]:
    """``-m MODULE --stage NAME ...`` of one stage of this run (its command without the interpreter)."""
    flags = ["-m", STAGES[name][0], "--stage", name, "--device", str(args.device), "--out-dir", str(args.out_dir),
             "--budget-s", f"{args.budgets[name]:g}", "--memory-fraction", f"{args.memory_fraction:g}"]
    return flags + (["--tiny"] if args.tiny else [])


def stage_command(name: str, args: argparse.Namespace) -> list[str]:
    """The process this run starts for stage ``name``."""
    return [sys.executable, *stage_args(name, args), "--run-command", args.command]


def read_result(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_process(command: list[str], log: Path, timeout: float) -> int | None:
    """Exit status of ``command`` (output in ``log``), None when it ran past ``timeout`` seconds and was
    killed with its process group."""
    with log.open("w", encoding="utf-8") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        finally:
            if process.poll() is None:  # timed out, or this run was interrupted
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def exit_text(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit status {code}"


def run_stage(name: str, args: argparse.Namespace, head: dict, out: Path, time_left: float) -> tuple[dict, dict]:
    """Stage ``name`` as its own process (or not, when ``time_left`` does not cover its budget); its record
    as written to ``out/<stage>_<tag>.json`` and its summary entry."""
    budget, tag = args.budgets[name], head["device_tag"]
    path, log = out / f"{name}_{tag}.json", out / "logs" / f"{name}_{tag}.log"
    timeout = budget + args.margin_s
    entry = {"budget_s": budget, "timeout_s": timeout, "file": path.name}
    base = {**head, "command": shlex.join(["python", *stage_args(name, args)]), "run_command": head["command"],
            "stage": name, "budget_s": budget, "parts": {}, "wall_s": 0.0}  # the file when the stage left none
    if time_left < budget:
        record = {**base, "status": "skipped_time",
                  "reason": f"{time_left:.0f} s left of the run's budget, the stage's budget is {budget:.0f} s"}
        write_json(path, record)
        return record, {**entry, "status": record["status"], "wall_s": 0.0, "process_wall_s": 0.0}
    path.unlink(missing_ok=True)  # a file from an earlier run must not stand in for this one's
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"bench-gpu: {name}: {base['command']} (killed after {timeout:.0f} s)", file=sys.stderr, flush=True)
    start = time.monotonic()
    code = run_process(stage_command(name, args), log, timeout)
    wall = time.monotonic() - start
    tail = log.read_text(encoding="utf-8", errors="replace")[-LOG_TAIL:]
    record = read_result(path)
    if code is None:
        record = {**(record or base), "status": "timed_out", "wall_s": wall, "log_tail": tail,
                  "reason": f"killed after {timeout:.0f} s: the stage's budget ({budget:.0f} s) plus the margin "
                            f"({args.margin_s:.0f} s, --margin-s); parts finished by then are kept"}
    elif record is None or record.get("status") == "running":
        record = {**(record or base), "status": "failed", "wall_s": wall, "log_tail": tail,
                  "error": f"the stage process ended ({exit_text(code)}) without its result"}
    elif code != 0 and record.get("status") != "failed":
        record = {**record, "status": "failed", "log_tail": tail,
                  "error": f"the stage process ended with {exit_text(code)} after writing status {record.get('status')}"}
    elif record.get("status") == "failed":
        record = {**record, "log_tail": tail}
    write_json(path, record)
    entry.update(status=record["status"], wall_s=record.get("wall_s", wall), process_wall_s=wall,
                 log=str(log.relative_to(out)))
    print(f"bench-gpu: {name}: {record['status']} ({wall:.0f} s) -> {path}", file=sys.stderr, flush=True)
    return record, entry


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.measure.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", help="cuda, cuda:N or cpu (default cuda; cpu needs --tiny)")
    p.add_argument("--tiny", action="store_true",
                   help="tiny models and counts (one CPU thread on the CPU): checks every stage's code path")
    p.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES), help="stages to run (all)")
    p.add_argument("--out-dir", default="benchmarks/results", help="where the JSON files go (benchmarks/results)")
    p.add_argument("--budget-s", type=float, default=TOTAL_BUDGET_S, help=f"the run's time budget ({TOTAL_BUDGET_S})")
    p.add_argument("--memory-fraction", type=float, default=Plan.memory_fraction,
                   help="train-8b: run a mode only if its predicted memory is at most this fraction of the device's")
    p.add_argument("--stage-budget", action="append", default=[], metavar="NAME=SECONDS",
                   help="change one stage's budget (repeatable)")
    p.add_argument("--margin-s", type=float, default=MARGIN_S,
                   help=f"a stage process still running at its budget plus this is killed ({MARGIN_S:g})")
    args = p.parse_args(argv)
    budgets = {name: spec[1] for name, spec in STAGES.items()}
    for item in args.stage_budget:
        name, _, seconds = item.partition("=")
        if name not in STAGES or not re.fullmatch(r"\d+(\.\d*)?", seconds):
            p.error(f"--stage-budget {item!r}: expected NAME=SECONDS with NAME one of {', '.join(STAGES)}")
        budgets[name] = float(seconds)
    args.budgets = budgets
    args.device = resolve_device(p, args.device, args.tiny)
    args.command = "python -m pipeline.measure.gpu " + " ".join(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> int:
    start = time.monotonic()
    args = parse_args(argv)
    head = header(args.device, tiny=args.tiny, command=args.command)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {**head, "budget_s": args.budget_s, "margin_s": args.margin_s, "stages": {}}
    for name in args.stages:
        _, summary["stages"][name] = run_stage(name, args, head, out, args.budget_s - (time.monotonic() - start))
    failed = [name for name, stage in summary["stages"].items() if stage["status"] == "failed"]
    timed_out = [name for name, stage in summary["stages"].items() if stage["status"] == "timed_out"]
    summary.update(wall_s=time.monotonic() - start, failed=failed, timed_out=timed_out,
                   exit_status=int(bool(failed or timed_out)))
    write_json(out / f"bench-gpu_{head['device_tag']}.json", summary)
    print(f"bench-gpu: {len(summary['stages'])} stages in {summary['wall_s']:.0f} s; failed: "
          f"{', '.join(failed) or 'none'}; timed out: {', '.join(timed_out) or 'none'}", file=sys.stderr)
    return summary["exit_status"]


if __name__ == "__main__":
    sys.exit(main())
