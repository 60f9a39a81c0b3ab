"""`python -m pipeline.study --budget tiny` end to end: study.json's structure, and every number in it
equals the scores.json it names."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.evaluation.scoring import load_scores
from pipeline.study.plan import ROWS
from pipeline.study.table import COLUMNS, table_values
from train_student.metrics import read_jsonl

REPO = Path(__file__).resolve().parents[1]
SEEDS = [3]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    cmd = [sys.executable, "-m", "pipeline.study", "--out", str(out), "--budget", "tiny", "--seeds", "1",
           "--seed-offset", str(SEEDS[0])]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def test_study_writes_every_row_from_its_evaluation_files(study):
    data = json.loads((study / "study.json").read_text())
    assert set(data) == {"rows", "teacher", "chance", "config"}
    assert list(data["rows"]) == ["sft", "drive-kd", "drive-kd-reference", "no-agp", "single-perception",
                                  "single-reasoning", "single-planning"] == list(ROWS)
    sources = set()
    for name, row in data["rows"].items():
        assert [s["seed"] for s in row["seeds"]] == SEEDS, name
        for entry in row["seeds"]:
            expected = table_values(load_scores(entry["eval"])["table"])
            assert {k: entry[k] for k in COLUMNS} == expected, name
            sources.add(entry["eval"])
        assert row["mean"] == {k: row["seeds"][0][k] for k in COLUMNS}
        assert row["std"] == {k: 0.0 if row["mean"][k] is not None else None for k in COLUMNS}
    assert len(sources) == len(ROWS)  # one evaluation per row and seed
    assert {k: data["teacher"][k] for k in COLUMNS} == table_values(load_scores(data["teacher"]["eval"])["table"])
    assert all(0 < data["chance"][k] < 100 for k in COLUMNS)
    assert data["config"]["seeds"] == SEEDS and data["config"]["budget"] == "tiny"


def test_study_table_and_plot(study):
    table = (study / "study.md").read_text()
    for name in ["teacher", *ROWS, "chance"]:
        assert any(line.startswith(f"| {name} |") for line in table.splitlines()), name
    assert "| Row | Perception | Reasoning | Planning | Avg. |" in table
    assert (study / "study.png").stat().st_size > 1000


def test_study_summarises_the_gradient_ratios_its_runs_logged(study):
    ratios = json.loads((study / "grad_ratios.json").read_text())
    seed = f"seed-{SEEDS[0]}"
    # sft and no-agp keep no gradient bank, so they log no ratios; every bank row does
    assert set(ratios["runs"]) == {f"{seed}/{row}" for row in ROWS if row not in ("sft", "no-agp")}
    for name, entry in ratios["runs"].items():
        rows = [json.loads(line) for line in (study / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        first, last = rows[0]["grad_ratio_weighted"], rows[-1]["grad_ratio_weighted"]
        assert set(entry["grad_ratio_weighted"]) == set(first), name
        for term, figures in entry["grad_ratio_weighted"].items():
            assert figures["step1"] == first[term] and figures["last"] == last[term], (name, term)
        assert entry["final_ce"] == rows[-1]["losses"]["ce"]
    assert ratios["runs"][f"{seed}/drive-kd"]["calibrated_lambdas"] == rows_calibration(study, f"{seed}/drive-kd")
    assert "calibrated_lambdas" not in ratios["runs"][f"{seed}/drive-kd-reference"]
    balanced = ratios["runs"][f"{seed}/drive-kd"]["grad_ratio_weighted"]
    assert all(abs(figures["step1"] - 0.5) < 0.01 for figures in balanced.values())  # balanced: 0.5 of CE's


def rows_calibration(study: Path, name: str) -> dict:
    return json.loads((study / "runs" / name / "metrics.jsonl").read_text().splitlines()[0])["calibration"]["lambdas"]


def test_study_rows_differ_only_by_their_flags(study):
    configs = {name: yaml.safe_load((study / "runs" / f"seed-{SEEDS[0]}" / name / "config.yaml").read_text())
               for name in ROWS}
    assert configs["sft"]["loss"]["sft"] and not configs["drive-kd"]["loss"]["sft"]
    assert not configs["no-agp"]["method"]["agp"] and configs["drive-kd"]["method"]["agp"]
    assert set(map(tuple, configs["single-planning"]["loss"]["mix"].values())) == {(0.0, 0.0, 1.0)}
    assert all(config["run"]["seed"] == SEEDS[0] for config in configs.values())


def test_study_trains_chosen_rows_from_caches_of_a_chosen_codec(tmp_path):
    """--rows and --cache-codec(-param): only those rows train and are tabled, from teacher caches written
    with that codec (what a lossy cache does to training is measured this way: README, "The study")."""
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "pipeline.study", "--out", str(out), "--budget", "tiny", "--seeds", "1",
           "--seed-offset", str(SEEDS[0]), "--rows", "drive-kd", "--cache-codec", "quant2",
           "--cache-codec-param", "entropy=tans", "--cache-codec-param", "tv_rel_error=0.035"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # recorded: a CPU run's scores depend on the thread count
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    study = json.loads((out / "study.json").read_text())
    assert (study["config"]["torch_threads"], study["config"]["OMP_NUM_THREADS"]) == (1, "1")
    assert "Torch intra-op threads: 1 (OMP_NUM_THREADS=1)" in (out / "study.md").read_text()
    trainer = read_jsonl(out / "runs" / f"seed-{SEEDS[0]}" / "drive-kd" / "environment.jsonl")
    assert [(e["step"], e["torch_threads"], e["OMP_NUM_THREADS"]) for e in trainer] == [(0, 1, "1")]
    assert list(study["rows"]) == ["drive-kd"] and list(study["config"]["rows"]) == ["drive-kd"]
    assert sorted(p.name for p in (out / "runs" / f"seed-{SEEDS[0]}").iterdir()) == ["drive-kd"]
    codec = json.loads((out / "caches" / f"seed-{SEEDS[0]}" / "cache.json").read_text())["codec"]
    assert codec["name"] == "quant2" and codec["params"]["tv_rel_error"] == 0.035
    assert "quant2" in (out / "study.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--rows", "drive-kd,nope"], "name each row once"),
    (["--rows", "sft,sft"], "name each row once"),
    (["--cache-codec-param", "entropy=tans"], "needs --cache-codec"),
])
def test_study_refuses_unknown_rows_and_codec_parameters_without_a_codec(argv, message, capsys, tmp_path):
    from pipeline.study.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(tmp_path), "--budget", "tiny", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
