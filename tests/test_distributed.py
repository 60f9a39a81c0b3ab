"""Several processes (train_student.distributed): the real CLI under torchrun, gloo, 2 CPU processes, tiny models.

DDP and FSDP2 runs equal one process on the same samples (losses of every step, the trained weights, the
samples of every step); an FSDP run resumed with the same world size equals the uninterrupted one, and a
resume with another world size, a rank that dies and an unavailable backend stop with clear errors.
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForImageTextToText

from train_student.config import ConfigError, MethodConfig, RunConfig
from train_student.distributed import Dist, init_distributed, order_seed, pick_backend, sum_gradients
from train_student.metrics import read_jsonl
from train_student.train import main

SAMPLES, ACCUM, STEPS = 8, 4, 2
REWEIGHT_LR = MethodConfig().reweight_lr
TORCHRUN_TIMEOUT = 900
"""Seconds a torchrun launch may take (~15-25 s on two free cores; far more on a loaded machine)."""
COMMON = ("--set", "run.progress=false", "--set", "data.num_workers=0", "--set", "run.device=cpu",
          "--set", f"optim.grad_accum={ACCUM}", "--set", "run.save_every=0", "--set", "optim.lr=1e-3",
          "--set", "loss.kind=kl", "--set", "loss.scale=balanced", "--max-steps", str(STEPS))
"""KL terms at a balanced scale, so that the distillation terms and AGP change the update; lr 1e-3, so that
a step on other samples or another gradient moves the weights far beyond the tolerance."""


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    """8 generated samples in 4 shards of 2 (ranks 0 and 1 read two each per window), the tiny teacher's
    cache, and the one-process reference run."""
    from cache_teacher.run import CacheConfig, run
    from pipeline.data.demo import generate
    from pipeline.data.ingest import ingest

    root = tmp_path_factory.mktemp("distributed")
    generate(root / "demo", samples=SAMPLES, seed=5, views="1")
    ingest(root / "demo" / "qa.json", root / "demo", root / "shards", shard_size=2)
    run(CacheConfig(teacher=str(tiny_models["internvl", "teacher"]), data=str(root / "shards"),
                    out=str(root / "cache"), workers=0))
    paths = {"student": str(tiny_models["internvl", "student"]), "data": str(root / "shards"),
             "cache": str(root / "cache"), "root": root}
    main(args(paths, root / "one"))
    return paths


def args(paths, out, *extra):
    return ["--student", paths["student"], "--data", paths["data"], "--cache", paths["cache"], "--out", str(out),
            *COMMON, *extra]


def torchrun(argv) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 -m train_student ARGV``; TimeoutExpired if it hangs."""
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                           "--nproc-per-node", "2", "-m", "train_student", *argv], env=env,
                          capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT)


def trained(run_dir, step=STEPS) -> dict:
    return AutoModelForImageTextToText.from_pretrained(run_dir / f"checkpoint-{step}").state_dict()


def assert_same_training(setup, run_dir):
    """Per step: the same samples and losses (and calibration); then the same weights, within float tolerance.

    The ranks sum their parts of a window in another order than one process: ~1e-7 relative at step 1.
    AdamW turns that rounding noise in near-zero gradient coordinates into up to ~1e-3 of a step (1e-6 at lr
    1e-3), which moves the small attention losses of step 2 by up to ~3e-5 relative; training on other
    samples, or a gradient not summed over the ranks, moves the weights by ~lr (1e-3). The reweighting's own
    AdamW step moves each ``a_k`` by about its lr whatever its gradient's size, so a reweighting gradient near
    0 whose sign that rounding flips moves a term weight by up to ~2 lr per step (seen: CE's 1 +- 2.8e-4 at
    step 2 on an AVX-512 CPU): the term weights compare within that."""
    reference = setup["root"] / "one"
    rows, expected = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(reference / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)) and [r["samples"] for r in rows] == [ACCUM] * STEPS
    for row, ref in zip(rows, expected):
        rel = 1e-5 if row["step"] == 1 else 2e-4
        assert row["losses"] == pytest.approx(ref["losses"], rel=rel)
        assert row["weights"] == pytest.approx(ref["weights"], rel=max(rel, 2 * REWEIGHT_LR * row["step"]))
        assert row["grad_norm"] == pytest.approx(ref["grad_norm"], rel=2e-4)  # float32 Gram: ~3e-5 at 3e5 entries
        assert row["fired"] == ref["fired"]
    assert rows[0]["calibration"]["lambdas"] == pytest.approx(expected[0]["calibration"]["lambdas"], rel=1e-5)
    steps = [[(line["step"], line["key"]) for line in read_jsonl(d / "samples.jsonl")] for d in (run_dir, reference)]
    assert steps[0] == steps[1]
    start = AutoModelForImageTextToText.from_pretrained(setup["student"]).state_dict()
    a, b = trained(run_dir), trained(reference)
    diff = torch.cat([(a[k] - b[k]).flatten() for k in b])
    update = torch.cat([(b[k] - start[k]).flatten() for k in b])
    assert diff.norm() < 1e-3 * update.norm() and diff.abs().max() < 1e-4  # lr 1e-3: a tenth of a step


def test_ddp_equals_one_process(setup):
    out = setup["root"] / "ddp"
    done = torchrun(args(setup, out, "--set", "run.parallel=ddp"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_training(setup, out)
    assert "on cpu (rank 0 of 2 processes, run.parallel=ddp (backend gloo))" in done.stderr
    assert not list(out.glob(".write-test*")) and (out / "checkpoint-2" / "meta.json").is_file()


def test_fsdp_resumed_equals_one_process_and_other_world_size_is_refused(setup):
    out = setup["root"] / "fsdp"
    first = torchrun(args(setup, out, "--set", "run.parallel=fsdp", "--max-steps", "1"))
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun(args(setup, out, "--set", "run.parallel=fsdp"))  # resumes checkpoint-1, same world size
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming" in second.stderr and "calibrated" not in second.stderr
    assert_same_training(setup, out)
    with pytest.raises(SystemExit) as exc:  # one process on the 2-process checkpoint
        main(args(setup, out, "--max-steps", "3"))
    message = str(exc.value.code)
    assert "world size 2" in message and "this run has world size 1" in message and "--nproc-per-node 2" in message


def test_a_rank_that_dies_stops_the_others_with_its_error(setup, tmp_path):
    """Rank 1 fails on its first sample while rank 0 trains on and waits for it at the window's end: torchrun
    stops rank 0 (which would stop by itself after run.timeout_s) and reports rank 1's error; no hang."""
    data = tmp_path / "shards"
    shutil.copytree(setup["data"], data)
    (data / "shard-000001.tar").unlink()  # the first shard of rank 1 (shards in manifest order)
    done = torchrun(["--student", setup["student"], "--data", str(data), "--out", str(tmp_path / "run"), "--sft",
                     *COMMON[:-2], "--set", "run.parallel=ddp", "--set", "data.shuffle_shards=false",
                     "--set", "run.timeout_s=60"])
    assert done.returncode != 0
    assert "error (rank 1 of 2): shard" in done.stderr and "shard-000001.tar does not exist" in done.stderr
    assert "rank      : 1" in done.stderr  # torchrun's failure summary names the rank that died
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_launch_errors_name_the_fix(monkeypatch):
    with pytest.raises(ConfigError, match="run.backend=nccl is not available"):
        pick_backend("nccl", torch.device("cpu"))
    assert pick_backend("auto", torch.device("cpu")) == "gloo"
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="launched as 2 processes .* but run.parallel=none"):
        init_distributed(RunConfig(out="x"))
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ConfigError, match=r"needs torchrun's environment .*torchrun --nproc-per-node N"):
        init_distributed(RunConfig(out="x", parallel="ddp"))


def test_order_seed_and_gradient_sum():
    assert order_seed(42, 0, 5) == order_seed(42, 0, 5) != order_seed(42, 0, 6)
    assert len({order_seed(42, e, p) for e in range(3) for p in range(100)}) == 300
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(1))]
    params[0].grad = torch.tensor([1.0, 2.0, 3.0])
    calls = []
    sum_gradients(params, lambda flat: (calls.append(flat.numel()), flat.mul_(2)), bucket_elements=4)
    assert calls == [3, 4, 1] and params[0].grad.tolist() == [2.0, 4.0, 6.0] and params[1].grad.abs().sum() == 0
    assert Dist().data_world == 1 and Dist(parallel="fsdp", world=4).data_world == 1
    assert Dist(parallel="ddp", rank=1, world=4).data_rank == 1
