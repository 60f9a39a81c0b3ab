"""Run the study: every stage is one of the project's own commands, logged under OUT/logs.

pipeline may not import the jobs, so `train_student` and `cache_teacher` run as subprocesses, as a user
would run them. The pipeline commands (`pipeline.demo_data`, `pipeline.ingest`, `pipeline.models tiny`,
`pipeline.evaluate`) run in this process through their own `main(argv)`, with the same arguments,
which saves a Python start-up per stage. A stage whose output already exists is skipped, so an
interrupted study resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import demo_data, ingest
from pipeline import evaluate as evaluate_cli
from pipeline.models import __main__ as models_cli
from pipeline.study.plan import EVAL_DATA_SEED, ROWS, TEACHER_DATA_SEED, Budget

LOG_TAIL = 3000
DONE = "STUDY_DONE"  # marker of a finished stage
SHARD_SIZE = 100
EVAL_FLAGS = ["--max-new-tokens", "32", "--batch-size", "32"]
IN_PROCESS = {"pipeline.demo_data": demo_data.main, "pipeline.ingest": ingest.main,
              "pipeline.models": models_cli.main, "pipeline.evaluate": evaluate_cli.main}
"""pipeline commands run through their main(argv) in this process."""


@dataclass
class Runner:
    """Runs commands from the repository root, one log file per stage; keeps what it ran and how long."""

    out: Path
    commands: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def __call__(self, stage: str, module: str, *args) -> None:
        argv = [str(arg) for arg in args]
        command = ["python", "-m", module, *argv]
        self.commands.append(shlex.join(command))
        log = self.out / "logs" / f"{stage}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"study: {stage}: {shlex.join(command[1:])}", flush=True)
        start = time.perf_counter()
        with log.open("w", encoding="utf-8") as handle:
            if module in IN_PROCESS:
                code = _call(IN_PROCESS[module], argv, handle)
            else:
                code = subprocess.run([sys.executable, *command[1:]], stdout=handle, stderr=subprocess.STDOUT,
                                      check=False).returncode
        self.seconds[stage] = round(time.perf_counter() - start, 1)
        if code != 0:
            tail = log.read_text(encoding="utf-8", errors="replace")[-LOG_TAIL:]
            raise RuntimeError(f"study stage {stage!r} failed (exit {code}): {shlex.join(command)}\n"
                               f"log {log}, last lines:\n{tail}")


def _call(main, argv: list[str], handle) -> int:
    """Exit status of `main(argv)` with its output in `handle` (argparse errors exit with 2)."""
    with contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
        try:
            main(argv)
        except SystemExit as exit_:
            return exit_.code if isinstance(exit_.code, int) else 1
    return 0


def make_split(run: Runner, name: str, *, samples: int, seed: int, captions: int = 0) -> Path:
    """Generated scenes (front camera) ingested into shards: OUT/shards/NAME (plus `captions` scene
    descriptions, the teacher's dense supervision)."""
    shards = run.out / "shards" / name
    if not (shards / "manifest.json").is_file():
        raw = run.out / "data" / name
        run(f"data-{name}", "pipeline.demo_data", "--out", raw, "--samples", samples, "--seed", seed, "--views", "1",
            "--captions", captions)
        run(f"ingest-{name}", "pipeline.ingest", "--qa", raw / "qa.json", "--image-root", raw, "--out", shards,
            "--shard-size", SHARD_SIZE)
    return shards


def make_model(run: Runner, role: str, *, seed: int) -> Path:
    """A random-initialised tiny InternVL model: OUT/models/ROLE-SEED."""
    out = run.out / "models" / f"{role}-{seed}"
    if not (out / "config.json").is_file():
        run(f"init-{role}-{seed}", "pipeline.models", "tiny", "--family", "internvl", "--role", role, "--out", out,
            "--seed", seed)
    return out


def pretrain_vision(run: Runner, model: Path, name: str, *, steps: int, scenes: int, seed: int) -> Path:
    """`model` with its vision tower and projector pretrained on dense scene labels: OUT/models/NAME
    (`model` itself when `steps` is 0)."""
    if steps <= 0:
        return model
    out = run.out / "models" / name
    if not (out / "vision_pretrain.json").is_file():
        run(name, "pipeline.models", "pretrain-vision", "--model", model, "--out", out, "--steps", steps,
            "--scenes", scenes, "--seed", seed, "--heldout", min(200, scenes), "--no-progress")
    return out


def train(run: Runner, name: str, *, model: Path, data: Path, config: str, steps: int | None, seed: int,
          flags: list[str]) -> Path:
    """A train_student run in OUT/runs/NAME; returns its last checkpoint. An unfinished run is resumed
    (the trainer continues from RUN/latest); a finished one carries the DONE marker and is reused."""
    out = run.out / "runs" / name
    if not (out / DONE).is_file():
        limit = ["--max-steps", steps] if steps is not None else []
        run(f"train-{name.replace('/', '-')}", "train_student", "--student", model, "--data", data, "--out", out,
            "--config", config, "--set", f"run.seed={seed}", "--set", "run.progress=false", *limit, *flags)
        (out / DONE).touch()
    return out / (out / "latest").read_text(encoding="utf-8").strip()


def evaluate(run: Runner, name: str, *, model: Path, data: Path) -> Path:
    """Held-out scores of `model`: OUT/evals/NAME/scores.json."""
    out = run.out / "evals" / name
    if not (out / "scores.json").is_file():
        run(f"eval-{name.replace('/', '-')}", "pipeline.evaluate", "--model", model, "--data", data, "--out", out,
            "--name", name, *EVAL_FLAGS)
    return out / "scores.json"


def teacher_cache(run: Runner, seed: int, *, teacher: Path, data: Path, student: Path,
                  codec: list[str] = ()) -> Path:
    """The teacher's attention over one seed's student split, pre-grouped for the student; ``codec``: the
    cache job's storage flags (--codec, --codec-param; none: its default, lossless)."""
    out = run.out / "caches" / f"seed-{seed}"
    if not (out / DONE).is_file():
        run(f"cache-seed-{seed}", "cache_teacher", "--teacher", teacher, "--data", data, "--out", out,
            "--workers", "0", "--student", student, *codec)
        (out / DONE).touch()
    return out


def run_study(out: Path, *, budget: Budget, seeds: list[int], teacher: Path | None, rows: list[str] | None = None,
              codec: list[str] = ()) -> dict:
    """Trains (or reuses) the teacher once, then every row (``rows``: those of ROWS, default all) for every
    seed, from teacher caches written with the cache job's ``codec`` flags; returns the evaluation files.

    Result: {"teacher": scores.json, "rows": {row: {seed: scores.json}}, "commands": [...], "seconds": {...}}.
    """
    run = Runner(out)
    held_out = make_split(run, "eval", samples=budget.eval_samples, seed=EVAL_DATA_SEED)
    if teacher is None:
        teacher_data = make_split(run, "teacher", samples=budget.teacher_samples, seed=TEACHER_DATA_SEED,
                                  captions=budget.teacher_captions)
        init = pretrain_vision(run, make_model(run, "teacher", seed=0), "teacher-vision",
                               steps=budget.teacher_vision_steps, scenes=budget.teacher_vision_scenes,
                               seed=TEACHER_DATA_SEED)
        teacher = train(run, "teacher", model=init, data=teacher_data,
                        config=budget.teacher_config, steps=budget.teacher_steps, seed=0, flags=["--sft"])
    rows = list(ROWS) if rows is None else rows
    files: dict = {"teacher": evaluate(run, "teacher", model=teacher, data=held_out), "rows": {r: {} for r in rows}}
    for seed in seeds:
        data = make_split(run, f"student-{seed}", samples=budget.student_samples, seed=seed)
        student = pretrain_vision(run, make_model(run, "student", seed=seed), f"student-{seed}-vision",
                                  steps=budget.student_vision_steps, scenes=budget.student_vision_scenes, seed=seed)
        cache = None
        for row in rows:
            flags = ROWS[row]
            uses_cache = "--sft" not in flags
            if uses_cache and cache is None:
                cache = teacher_cache(run, seed, teacher=teacher, data=data, student=student, codec=codec)
            extra = [*flags, "--cache", f"perception,reasoning,planning={cache}"] if uses_cache else flags
            checkpoint = train(run, f"seed-{seed}/{row}", model=student, data=data, config=budget.student_config,
                               steps=budget.student_steps, seed=seed, flags=extra)
            files["rows"][row][seed] = evaluate(run, f"seed-{seed}/{row}", model=checkpoint, data=held_out)
    return {**files, "teacher_model": str(teacher), "commands": run.commands, "seconds": run.seconds}
