"""`make demo` end to end on a small sample count: every stage's outputs, and a report whose numbers
come from the evaluation files."""

import json
import os
import re
import subprocess
from pathlib import Path

from pipeline.cache.reader import open_cache
from pipeline.evaluation.scoring import load_scores

REPO = Path(__file__).resolve().parents[1]


def test_make_demo_small(tmp_path):
    inherited = {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MODEL_DIR", "DATA", "EVAL_DATA", "CACHES", "RUNS", "REPORT",
                 "TEACHER", "STUDENT", "ROOT"}  # `make test` exports some of these; the demo must use ROOT
    env = {k: v for k, v in os.environ.items() if k not in inherited} | {"PYTHONUNBUFFERED": "1"}
    cmd = ["make", "-C", str(REPO), "demo", f"ROOT={tmp_path}", "SAMPLES=24", "EVAL_SAMPLES=9"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    for stage in ["data/shards/manifest.json", "data/shards-eval/manifest.json", "models/demo-teacher/config.json",
                  "models/demo-student/config.json", "caches/demo-teacher/cache.json",
                  "runs/demo-sft/final/config.json", "runs/demo-drive-kd/final/config.json",
                  "runs/demo-drive-kd/metrics.jsonl", "reports/demo/report.md", "reports/demo/loss_curves.png"]:
        assert (tmp_path / stage).exists(), stage
    assert len(open_cache(tmp_path / "caches/demo-teacher")) == 24
    kd_rows = [json.loads(x) for x in (tmp_path / "runs/demo-drive-kd/metrics.jsonl").read_text().splitlines()]
    assert {"p", "r", "d"} <= set(kd_rows[-1]["losses"])

    report = (tmp_path / "reports/demo/report.md").read_text()
    for label, folder in [("teacher", "eval-teacher"), ("SFT baseline", "eval-sft"), ("Drive-KD", "eval-drive-kd")]:
        scores = load_scores(tmp_path / "reports/demo" / folder)
        row = next(line for line in report.splitlines() if line.startswith(f"| {label} |"))
        cells = [c.strip() for c in row.strip("|").split("|")][1:]
        expected = [scores["table"][c] for c in ("Perception", "Reasoning", "Planning", "Avg.")]
        for cell, value in zip(cells, expected):
            assert cell == ("–" if value is None else f"{value:.2f}"), (label, row, expected)
    assert len(re.findall(r"!\[overlay_", report)) == 6
    study = (REPO / "benchmarks/results/study/study.md").read_text()
    drive_kd = next(line for line in study.splitlines() if line.startswith("| drive-kd |"))
    assert "## The study (`make study`)" in report and drive_kd in report  # the committed study table, linked
    link = re.search(r"from \[study\.md\]\(([^)]+)\)", report).group(1)
    assert (tmp_path / "reports/demo" / link).resolve() == (REPO / "benchmarks/results/study/study.md").resolve()

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and "train_student" not in again.stdout  # finished stages are reused
