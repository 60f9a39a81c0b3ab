"""The Drive-KD study on generated scenes: ``python -m pipeline.study`` (``make study``).

Argument parsing and one call into pipeline.study.run and pipeline.study.table."""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time
from pathlib import Path

import torch

from pipeline.study.plan import BUDGETS, EVAL_DATA_SEED, ROWS, TEACHER_DATA_SEED
from pipeline.study.run import run_study
from pipeline.study.table import build_study, write_outputs


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.study",
        description="Train the tiny teacher once on a large generated split, then for each seed train every "
                    f"student row ({', '.join(ROWS)}) on a smaller split with the same steps, evaluate all on "
                    "one held-out split and write OUT/study.json, study.md (Table 3 layout, mean ± std over "
                    "seeds), study.png and grad_ratios.json (each run's weighted gradient-norm ratios to CE). "
                    "Stages run as subprocesses of the project's commands; finished stages are reused when OUT "
                    "is run again.",
        epilog="example: python -m pipeline.study --out reports/study --seeds 3 --budget full")
    parser.add_argument("--out", default="reports/study", help="output folder (default reports/study)")
    parser.add_argument("--seeds", type=_positive, default=1, help="number of seeds (default 1)")
    parser.add_argument("--seed-offset", type=int, default=0,
                        help="seed s draws the student split's scenes, the student initialisation and the data "
                             "order of seed OFFSET+s (default 0)")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="quick",
                        help="tiny: suite test (1 step); quick: ~12 min per seed on 2 cores; full: >= 3 seeds "
                             "in ~60 min (default quick)")
    parser.add_argument("--teacher", type=Path,
                        help="an already trained teacher directory to reuse instead of training one (default: the "
                             "budget's, e.g. benchmarks/demo-teacher for quick)")
    parser.add_argument("--student-vision-steps", type=int, metavar="N",
                        help="pretrain each seed's student vision tower and projector for N steps before every row "
                             "(python -m pipeline.models pretrain-vision; the students start like the paper's, from "
                             "a pretrained encoder); default: the budget's (0: random students)")
    parser.add_argument("--rows", metavar="ROW[,ROW...]",
                        help=f"train only these student rows, in this order (default all: {','.join(ROWS)}); e.g. "
                             "drive-kd with --cache-codec to measure what lossy teacher caches do")
    parser.add_argument("--cache-codec", metavar="CODEC",
                        help="the teacher caches' codec (python -m cache_teacher --codec; default its own, lossless)")
    parser.add_argument("--cache-codec-param", action="append", default=[], metavar="KEY=VALUE",
                        help="a parameter of --cache-codec, repeatable (python -m cache_teacher --codec-param), e.g. "
                             "entropy=tans, tv_rel_error=0.035")
    args = parser.parse_args(argv)
    rows = None
    if args.rows is not None:
        rows = [row.strip() for row in args.rows.split(",") if row.strip()]
        unknown = [row for row in rows if row not in ROWS]
        if unknown or not rows or len(set(rows)) != len(rows):
            parser.error(f"--rows {args.rows!r}: name each row once, from {', '.join(ROWS)}")
    if args.cache_codec_param and not args.cache_codec:
        parser.error("--cache-codec-param needs --cache-codec (the codec the parameters belong to), e.g. "
                     "--cache-codec quant2 --cache-codec-param entropy=tans")
    codec = [] if args.cache_codec is None else ["--codec", args.cache_codec]
    codec += [flag for item in args.cache_codec_param for flag in ("--codec-param", item)]
    budget = BUDGETS[args.budget]
    if args.student_vision_steps is not None:
        if args.student_vision_steps < 0:
            parser.error(f"--student-vision-steps must be >= 0, got {args.student_vision_steps}")
        budget = dataclasses.replace(budget, student_vision_steps=args.student_vision_steps)
    seeds = [args.seed_offset + s for s in range(args.seeds)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    teacher = args.teacher or (Path(budget.teacher) if budget.teacher else None)
    if teacher is not None and not (teacher / "config.json").is_file():
        parser.error(f"--teacher {teacher}: no config.json there; pass a trained teacher directory "
                     "(make demo-teacher writes benchmarks/demo-teacher) or use --budget full to train one")
    files = run_study(out, budget=budget, seeds=seeds, teacher=teacher, rows=rows, codec=codec)
    config = {"budget": args.budget, "sizes": budget.to_dict(), "seeds": seeds, "seed_offset": args.seed_offset,
              "teacher_data_seed": TEACHER_DATA_SEED, "eval_data_seed": EVAL_DATA_SEED,
              "teacher_model": files["teacher_model"], "rows": {row: ROWS[row] for row in files["rows"]},
              "cache_codec_flags": codec, "commands": files["commands"],
              "stage_seconds": files["seconds"], "wall_seconds": round(time.perf_counter() - start, 1),
              "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
              "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    study = build_study(files, config)
    write_outputs(study, out)
    print(f"study: wrote study.json, study.md, study.png and grad_ratios.json to {out}")


if __name__ == "__main__":
    main()
