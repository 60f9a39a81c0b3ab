"""The real trainer CLI on tiny models: SFT and Drive-KD runs, exact resume, kill + resume trains every
sample once, and bad input stopping before training (or before a poisoned checkpoint)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText

from pipeline.data.shards import iter_samples
from pipeline.report.curves import plot_run
from train_student.metrics import read_jsonl
from train_student.train import main

SAMPLES = 12


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    """Generated QA shards (4 shards of 3 samples) and a tiny InternVL teacher's cache of them."""
    from cache_teacher.run import CacheConfig, run
    from pipeline.data.demo import generate
    from pipeline.data.ingest import ingest

    root = tmp_path_factory.mktemp("train-cli")
    generate(root / "demo", samples=SAMPLES, seed=11, views="1")
    ingest(root / "demo" / "qa.json", root / "demo", root / "shards", shard_size=3)
    teacher = tiny_models["internvl", "teacher"]
    run(CacheConfig(teacher=str(teacher), data=str(root / "shards"), out=str(root / "cache"), workers=0))
    return {"student": str(tiny_models["internvl", "student"]), "teacher": str(teacher),
            "data": str(root / "shards"), "cache": str(root / "cache"), "root": root}


def argv(setup, out, *extra, cache=True):
    return ["--student", setup["student"], "--data", setup["data"], *(["--cache", setup["cache"]] if cache else []),
            "--out", str(out), "--set", "run.progress=false", "--set", "data.num_workers=0", *extra]


def fails(args) -> str:
    with pytest.raises(SystemExit) as exc:
        main(args)
    return str(exc.value.code)


def test_sft_and_drive_kd_runs(setup, tmp_path):
    main(argv(setup, tmp_path / "sft", "--sft", "--max-steps", "2", cache=False))
    rows = read_jsonl(tmp_path / "sft" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(set(r["losses"]) == {"ce"} for r in rows)
    checkpoint = tmp_path / "sft" / "checkpoint-2"
    assert "drivekd_capture" not in (checkpoint / "config.json").read_text()  # no trace of the capture attention
    model = AutoModelForImageTextToText.from_pretrained(checkpoint)  # transformers alone
    assert model.config.get_text_config().num_hidden_layers == 4

    main(argv(setup, tmp_path / "kd", "--max-steps", "2", "--reference"))  # METHOD exactly
    run = tmp_path / "kd"
    rows = read_jsonl(run / "metrics.jsonl")
    assert len(rows) == 2 and all(set(r["losses"]) == {"ce", "p", "r", "d"} for r in rows)
    assert set(rows[0]["cos"]) == {"ce/p", "ce/r", "ce/d", "p/r", "p/d", "r/d"}
    assert set(rows[0]["fired"]["anchor"]) == {"p", "r", "d"} and rows[0]["weights"]["ce"] == 1.0
    assert rows[1]["weights"] != rows[0]["weights"]  # reweighting moved them (by ~1e-4)
    assert abs(rows[1]["weights"]["p"] - 1.0) < 1e-3
    keys = [r["key"] for r in read_jsonl(run / "samples.jsonl")]
    assert len(keys) == 8 == len(set(keys))
    assert (run / "config.yaml").is_file() and (run / "latest").read_text().strip() == "checkpoint-2"
    assert plot_run(run).is_file()


def test_resume_reproduces_the_uninterrupted_losses(setup, tmp_path):
    common = ("--set", "optim.grad_accum=2", "--set", "run.save_every=0")
    main(argv(setup, tmp_path / "whole", "--max-steps", "4", *common))
    main(argv(setup, tmp_path / "parts", "--max-steps", "2", *common))
    main(argv(setup, tmp_path / "parts", "--max-steps", "4", *common))
    whole, parts = (read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("whole", "parts"))
    assert [r["step"] for r in parts] == [1, 2, 3, 4]
    for a, b in zip(whole, parts):
        assert (a["losses"], a["weights"], a["lr"], a["fired"]) == (b["losses"], b["weights"], b["lr"], b["fired"])
    a = AutoModelForImageTextToText.from_pretrained(tmp_path / "whole" / "checkpoint-4").state_dict()
    b = AutoModelForImageTextToText.from_pretrained(tmp_path / "parts" / "checkpoint-4").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    starts = read_jsonl(tmp_path / "parts" / "environment.jsonl")  # one line per start: where it began, threads
    assert [e["step"] for e in starts] == [0, 2]
    assert all(e["torch_threads"] == torch.get_num_threads() and e["device"] == "cpu" and e["world"] == 1 for e in starts)
    message = fails(argv(setup, tmp_path / "parts", "--max-steps", "6", *common, "--set", "optim.lr=1e-3"))
    assert "config differs in optim.lr (5e-05 -> 0.001)" in message


def test_balanced_scale_hits_its_ratios_and_resumes_exactly(setup, tmp_path, capsys):
    common = ("--set", "optim.grad_accum=2", "--set", "run.save_every=0", "--set", "loss.scale=balanced",
              "--set", "loss.kind=kl", "--set", "loss.balance_ratio.reasoning=0.25")
    main(argv(setup, tmp_path / "whole", "--max-steps", "4", *common))
    assert "loss.scale=balanced calibrated on 2 samples" in capsys.readouterr().err
    main(argv(setup, tmp_path / "parts", "--max-steps", "2", *common))
    meta = json.loads((tmp_path / "parts" / "checkpoint-2" / "meta.json").read_text())
    capsys.readouterr()
    main(argv(setup, tmp_path / "parts", "--max-steps", "4", *common))
    assert "calibrated" not in capsys.readouterr().err  # the resume applies the stored calibration
    whole, parts = (read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("whole", "parts"))
    assert whole[0]["calibration"] == meta["calibration"] and meta["calibration"]["samples"] == 2
    assert whole[0]["grad_ratio_weighted"] == pytest.approx({"p": 0.5, "r": 0.25, "d": 0.5}, rel=0.01)
    assert whole[0]["weights"] == pytest.approx(meta["calibration"]["lambdas"], rel=1e-6)
    for a, b in zip(whole, parts):
        assert (a["losses"], a["weights"], a["grad_norm"], a["fired"]) == (b["losses"], b["weights"], b["grad_norm"],
                                                                          b["fired"])
    a = AutoModelForImageTextToText.from_pretrained(tmp_path / "whole" / "checkpoint-4").state_dict()
    b = AutoModelForImageTextToText.from_pretrained(tmp_path / "parts" / "checkpoint-4").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    meta_path = tmp_path / "parts" / "checkpoint-4" / "meta.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "calibration": None}))
    assert "no complete calibration record" in fails(argv(setup, tmp_path / "parts", "--max-steps", "6", *common))


def test_reference_scale_logs_gradient_ratios_and_warns_of_inert_terms(setup, tmp_path, capsys):
    main(argv(setup, tmp_path / "ref", "--max-steps", "2", "--set", "optim.grad_accum=2",
         "--reference"))
    rows = read_jsonl(tmp_path / "ref" / "metrics.jsonl")
    assert all(set(r["grad_ratio_weighted"]) == {"p", "r", "d"} for r in rows) and "calibration" not in rows[0]
    assert max(rows[0]["grad_ratio_weighted"].values()) < 1e-3  # METHOD section 9: MSE at lambda 1 is inert
    err = capsys.readouterr().err
    assert all(err.count(f"warning: inert term {t} ") == 1 for t in ("p", "r", "d"))
    assert "--set loss.scale=balanced" in err


def past_checkpoint(run: Path) -> bool:
    """True once metrics.jsonl has a row for a step after the latest checkpoint."""
    try:
        step = int((run / "latest").read_text().split("-")[1])
        return len((run / "metrics.jsonl").read_text().splitlines()) > step
    except (FileNotFoundError, IndexError, ValueError):
        return False


def test_killed_run_resumes_and_trains_each_sample_once(setup, tmp_path):
    run = tmp_path / "killed"
    args = argv(setup, run, "--set", "run.save_every=2", "--set", "optim.grad_accum=1")
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.Popen([sys.executable, "-m", "train_student", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and not past_checkpoint(run):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    checkpointed = int((run / "latest").read_text().split("-")[1])
    assert len(read_jsonl(run / "metrics.jsonl")) > checkpointed  # rows the resumed run must drop and redo
    main(args)
    lines = read_jsonl(run / "samples.jsonl")
    keys = [line["key"] for line in lines]
    assert len(keys) == SAMPLES == len(set(keys))
    assert [line["index"] for line in lines] == list(range(SAMPLES))
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(1, SAMPLES + 1))


def test_bad_input_stops_before_training(setup, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "is not writable" in fails(argv(setup, blocker / "run"))
    (tmp_path / "empty").mkdir()
    assert "no manifest.json in" in fails(["--student", setup["student"], "--data", str(tmp_path / "empty"),
                                           "--out", str(tmp_path / "r0"), "--sft"])
    foreign = tmp_path / "foreign-cache"
    shutil.copytree(setup["cache"], foreign)
    manifest = json.loads((foreign / "cache.json").read_text())
    manifest["teacher"]["family"] = "qwen2_5_vl"
    (foreign / "cache.json").write_text(json.dumps(manifest))
    message = fails([*argv(setup, tmp_path / "r1", cache=False), "--cache", str(foreign)])
    assert "perception/reasoning/planning cache" in message and "of family qwen2_5_vl" in message
    assert "the student is internvl" in message and message.count("of family") == 1
    assert not list((tmp_path / "r1").glob("checkpoint-*"))


def test_nonfinite_loss_stops_without_a_poisoned_checkpoint(setup, tmp_path):
    run = tmp_path / "nan"
    message = fails(argv(setup, run, "--set", "optim.lr=1e30", "--set", "optim.grad_accum=1",
                         "--set", "run.save_every=1", "--no-reweight"))
    trained = [line["key"] for line in read_jsonl(run / "samples.jsonl")]
    poisoned = message.split("optimizer step 2, sample ")[1].split()[0]
    assert len(trained) == 1 and poisoned in {s.key for s in iter_samples(setup["data"])} - set(trained)
    assert (run / "latest").read_text().strip() == "checkpoint-1" and not (run / "checkpoint-2").exists()


def test_out_of_memory_names_the_options_still_off(setup, tmp_path, monkeypatch):
    from train_student.step import MicroStepper

    def oom(self, item):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB\nmore detail")

    monkeypatch.setattr(MicroStepper, "micro_step", oom)
    message = fails(argv(setup, tmp_path / "oom", "--set", "model.freeze_vision=true"))
    assert message.startswith("error: out of memory (CUDA out of memory. Tried to allocate 9.00 GiB)")
    assert "--set method.bank_dtype=bf16" in message and "--set model.recompute_attention=true" in message
    assert "freeze_vision" not in message and "gradient_checkpointing" not in message
    assert f"--estimate-memory --student-shape {setup['student']}" in message
    sft = fails(argv(setup, tmp_path / "oom-sft", "--sft", cache=False))
    assert "--set model.gradient_checkpointing=true" in sft and "bank_dtype" not in sft and "recompute" not in sft


def test_missing_samples_error_or_skip_and_count(setup, tmp_path, capsys):
    partial = tmp_path / "partial-cache"
    shutil.copytree(setup["cache"], partial)
    (partial / "shards" / "shard-000001.done").unlink()
    args = [*argv(setup, tmp_path / "r", cache=False), "--cache", str(partial), "--set", "optim.grad_accum=3"]
    assert "is missing from the perception cache" in fails(args)
    main([*argv(setup, tmp_path / "skip", cache=False), "--cache", str(partial), "--skip-missing",
          "--set", "optim.grad_accum=3"])
    assert "9 samples trained, 3 skipped (missing from a cache" in capsys.readouterr().err
    lines = read_jsonl(tmp_path / "skip" / "samples.jsonl")
    assert len(lines) == SAMPLES and sum("skipped" in line for line in lines) == 3


def test_skip_missing_that_would_skip_every_sample_is_an_error(setup, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.cache.format import index_digest

    other = tmp_path / "other-data-cache"  # a cache of another data set: none of --data's keys
    shutil.copytree(setup["cache"], other)
    manifest = json.loads((other / "cache.json").read_text())
    manifest["dataset"]["dataset_digest"] = "f" * 64
    (other / "cache.json").write_text(json.dumps(manifest))
    for index in (other / "shards").glob("*.parquet"):
        table = pq.read_table(index)
        keys = pa.array([f"other-{k}" for k in table.column("key").to_pylist()])
        pq.write_table(table.set_column(table.schema.get_field_index("key"), "key", keys), index)
        marker = index.with_suffix(".done")
        marker.write_text(json.dumps({**json.loads(marker.read_text()), "index_sha256": index_digest(index.read_bytes())}))
    message = fails([*argv(setup, tmp_path / "r", cache=False), "--cache", str(other), "--skip-missing"])
    assert f"holds none of the {SAMPLES} samples" in message and "would skip every sample" in message
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").glob("checkpoint-*"))


def test_online_teacher_ablation_matches_the_cached_targets(setup, tmp_path):
    """Same first window: CE identical, attention terms equal up to the cache's float16 storage."""
    common = ("--max-steps", "1", "--set", "optim.grad_accum=2")
    main(argv(setup, tmp_path / "cached", *common))
    main(argv(setup, tmp_path / "online", *common, "--online-teacher", setup["teacher"], cache=False))
    cached, online = (read_jsonl(tmp_path / name / "metrics.jsonl")[0] for name in ("cached", "online"))
    assert online["losses"]["ce"] == pytest.approx(cached["losses"]["ce"], rel=1e-6)
    for term in ("p", "r", "d"):
        assert online["losses"][term] == pytest.approx(cached["losses"][term], rel=1e-2)
    assert online["fired"] == cached["fired"]


def test_epochs_visit_every_sample_once_each(setup, tmp_path):
    main(argv(setup, tmp_path / "sft", "--sft", "--set", "optim.epochs=2", "--set", "optim.grad_accum=5",
              cache=False))
    lines = read_jsonl(tmp_path / "sft" / "samples.jsonl")
    per_epoch = [[line["key"] for line in lines if line["epoch"] == e] for e in (0, 1)]
    assert sorted(per_epoch[0]) == sorted(per_epoch[1]) and len(set(per_epoch[0])) == SAMPLES
    assert [r["samples"] for r in read_jsonl(tmp_path / "sft" / "metrics.jsonl")] == [5, 5, 2, 5, 5, 2]
