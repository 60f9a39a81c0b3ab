"""``make bench-gpu`` on the CPU at tiny shapes: every stage's code path, the files and their fields, the
budget guard, failure recording, the stage processes and their hard timeout. The real-shape run needs a GPU.

The run (``pipeline.measure.gpu``) starts each stage as ``python -m MODULE --stage NAME``. A Python start-up
that imports torch and transformers costs seconds on a shared CPU, so most tests here run the stage
commands in this process (``in_process``, in place of ``gpu.run_process``); ``test_stages_run_as_processes``
and the timeout/crash test start real processes, and the GPU test runs every stage as one."""

import contextlib
import importlib
import json
import math
import sys
import textwrap
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForImageTextToText

from cache_teacher import bench as cache_bench
from cache_teacher import bench_gpu as cache_stages
from pipeline.measure import gpu, gpu_common
from pipeline.models.shapes import real_config
from train_student import bench as train_bench
from train_student import bench_gpu as train_stages

STATUSES = {"ok", "partial", "failed", "skipped_time", "skipped_memory", "not_available", "timed_out"}
# The CPU path checks code paths and files, not speed: the encode stage compiles the numba coders cold in a
# fresh clone, which overran its 60 s GPU-run budget on a loaded 2-core CI machine, so it gets more of the
# run's 540 s here (the tiny stages before it take seconds).
BUDGETS = {**{stage: budget for stage, (_, budget) in gpu.STAGES.items()}, "cache-encode": 400.0}
RUN = ["--device", "cpu", "--tiny"]


def load(out, stage):
    return json.loads(next(out.glob(f"{stage}_*.json")).read_text())


def positive(value):
    return isinstance(value, float | int) and math.isfinite(value) and value > 0


def in_process(command, log, timeout):
    """``gpu.run_process`` without the process: ``python -m MODULE ARGS`` through ``MODULE.main(ARGS)``."""
    assert command[0] == sys.executable and command[1] == "-m"
    main = importlib.import_module(command[2]).main
    with log.open("w") as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
        try:
            return main(command[3:])
        except SystemExit as exit_:
            return exit_.code if isinstance(exit_.code, int) else 1


@pytest.fixture
def stages_here(monkeypatch):
    monkeypatch.setattr(gpu, "run_process", in_process)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-gpu")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gpu, "run_process", in_process)
        return gpu.main([*RUN, "--stage-budget", f"cache-encode={BUDGETS['cache-encode']:g}", "--out-dir", str(out)]), out


def test_every_stage_writes_its_file_with_device_versions_and_command(tiny_run):
    status, out = tiny_run
    assert status == 0
    summary = load(out, "bench-gpu")
    tag = summary["device_tag"]
    assert tag.startswith("cpu-") and tag.endswith("-tiny") and summary["failed"] == summary["timed_out"] == []
    assert summary["command"].startswith("python -m pipeline.measure.gpu --device cpu --tiny")
    assert list(summary["stages"]) == list(gpu.STAGES)
    for stage, entry in summary["stages"].items():
        result = json.loads((out / f"{stage}_{tag}.json").read_text())
        assert entry["file"] == f"{stage}_{tag}.json" and entry["status"] == result["status"] in STATUSES
        assert (out / entry["log"]).is_file() and entry["timeout_s"] == entry["budget_s"] + gpu.MARGIN_S
        assert result["device"]["name"] == summary["device"]["name"] and result["device"]["total_memory_gib"] > 0
        assert result["torch"] == torch.__version__ and result["transformers"] and result["tiny"] is True
        assert result["torch_threads"] == 1 and result["stage"] == stage
        module = gpu.STAGES[stage][0]
        assert result["command"].startswith(f"python -m {module} --stage {stage} --device cpu")
        assert "--tiny" in result["command"] and "--run-command" not in result["command"]
        assert result["run_command"] == summary["command"]
        assert result["budget_s"] == BUDGETS[stage] and 0 <= result["wall_s"] < result["budget_s"]
    assert summary["wall_s"] < summary["budget_s"] == gpu.TOTAL_BUDGET_S


def test_cache_forward_figures(tiny_run):
    result = load(tiny_run[1], "cache-forward")
    assert result["status"] == "ok" and result["captured_layers"]
    for views in (1, 6):
        entry = result["views"][str(views)]
        assert positive(entry["forward_tflop"])
        for mode in ("eager", "capture"):
            part = result["parts"][f"views{views}_{mode}"]
            assert part["status"] == "ok" and positive(part["samples_per_s"]) and positive(part["median_s"])
            assert part["peak_memory_gib"] >= 0 and part["memory_kind"] == "cpu_rss_above_start"
            assert part["achieved_tflop_per_s"] == pytest.approx(entry["forward_tflop"] * part["samples_per_s"])
        assert entry["capture_speedup"] == pytest.approx(entry["capture_samples_per_s"] / entry["eager_samples_per_s"])
    assert result["views"]["6"]["seq_len"] > result["views"]["1"]["seq_len"]


def test_trainer_figures(tiny_run):
    small = load(tiny_run[1], "train-1b")
    assert small["status"] == "ok"
    assert set(small["parts"]) == {name for name, _ in train_bench.cached_modes(True)} | {"online_teacher"}
    for part in small["parts"].values():
        assert part["status"] == "ok" and positive(part["samples_per_s"]) and part["peak_memory_gib"] >= 0
    assert positive(small["ratios"]["drive_kd_agp_vs_online_samples_per_s"])
    large = load(tiny_run[1], "train-8b")
    assert large["status"] == "ok" and set(large["parts"]) == set(train_stages.LARGE_MODES)
    for part in large["parts"].values():
        assert part["status"] == "ok" and part["optimizer_step"] is False and positive(part["samples_per_s"])
        memory = part["predicted_memory"]
        assert memory["trainable"] < memory["parameters"]  # the vision tower is frozen
        assert 0 < memory["micro_steps_gib"] < memory["with_optimizer_step_gib"]
    assert large["parts"]["drive_kd_agp"]["predicted_memory"]["bank_gib"] > 0
    assert large["parts"]["sft"]["predicted_memory"]["bank_gib"] == 0


def test_deployment_and_encode_figures(tiny_run):
    deploy = load(tiny_run[1], "efficiency")
    assert deploy["status"] == "ok"
    for role in ("student", "large"):
        part = deploy["parts"][role]
        assert part["status"] == "ok" and positive(part["tokens_per_s"]) and positive(part["ttft_median_s"])
        assert part["peak_memory_gib"] >= 0 and all(run["new_tokens"] == 3 for run in part["per_prompt"])
    encode = load(tiny_run[1], "cache-encode")
    if hasattr(cache_bench, "encode_stage_figures"):
        assert encode["status"] == "ok" and set(encode["parts"]) == {f"maps{n}_{e}" for n in (23, 27) for e in ("zstd", "context")}
    else:  # not a success: the stage says what is missing
        assert encode["status"] == "not_available"
        assert "encode_stage_figures" in encode["parts"]["encode"]["reason"]


def test_stages_run_as_processes_and_the_run_guard_skips(tmp_path):
    """A real stage process (train-8b, every mode over the memory limit) and a stage the run's time left
    does not cover (efficiency: 100 s left < its 120 s budget), which does not start."""
    status = gpu.main([*RUN, "--out-dir", str(tmp_path), "--memory-fraction", "0", "--budget-s", "100",
                       "--stages", "train-8b", "efficiency"])
    assert status == 0  # skips are recorded, not failures
    large = load(tmp_path, "train-8b")
    assert large["status"] == "skipped_memory" and set(large["parts"]) == set(train_stages.LARGE_MODES)
    assert all("predicted" in part["reason"] and part["predicted_memory"] for part in large["parts"].values())
    assert large["command"].startswith("python -m train_student.bench_gpu --stage train-8b --device cpu")
    assert "--memory-fraction 0 " in large["command"] and large["torch_threads"] == 1 and "log_tail" not in large
    summary = load(tmp_path, "bench-gpu")
    assert summary["stages"]["train-8b"]["process_wall_s"] >= large["wall_s"]
    assert (tmp_path / summary["stages"]["train-8b"]["log"]).is_file()
    deploy = load(tmp_path, "efficiency")
    assert deploy["status"] == "skipped_time" and "budget" in deploy["reason"]
    assert deploy["command"].startswith("python -m pipeline.measure.gpu_stages --stage efficiency")
    assert "log" not in summary["stages"]["efficiency"]  # never started


def test_a_failing_stage_is_recorded_and_the_others_still_run(tmp_path, monkeypatch, stages_here):
    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    def failing(run, plan, device):
        run.run("views6_eager", out_of_memory)
        run.run("views6_capture", dict, samples_per_s=1.0)
        return {"teacher": plan.teacher}

    def broken(run, plan, device):
        raise RuntimeError("the model could not be built")

    monkeypatch.setitem(cache_stages.STAGES, "cache-forward", failing)
    monkeypatch.setitem(train_stages.STAGES, "train-1b", broken)
    status = gpu.main([*RUN, "--out-dir", str(tmp_path), "--memory-fraction", "0",
                       "--stages", "cache-forward", "train-1b", "train-8b", "cache-encode"])
    assert status == 1
    summary = load(tmp_path, "bench-gpu")
    assert summary["failed"] == ["cache-forward", "train-1b"] and summary["exit_status"] == 1
    forward = load(tmp_path, "cache-forward")
    assert forward["status"] == "failed" and forward["parts"]["views6_capture"]["status"] == "ok"
    assert forward["parts"]["views6_eager"]["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert "cache-forward: failed" in forward["log_tail"]
    assert load(tmp_path, "train-1b")["error"] == "RuntimeError: the model could not be built"
    assert load(tmp_path, "train-8b")["status"] == "skipped_memory"
    assert load(tmp_path, "cache-encode")["status"] in {"ok", "not_available"}


def alive(pid):
    """Whether process ``pid`` runs (a zombie, killed and not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in {"Z", "X"}
    except FileNotFoundError:
        return False


SLOW_STAGE = """
import json, subprocess, sys, time
path, pids = sys.argv[1], sys.argv[2]
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
open(pids, "w").write(f"{child.pid}")
json.dump({"stage": "cache-forward", "status": "running", "teacher": "t", "wall_s": 0.1,
           "parts": {"views1_eager": {"status": "ok", "samples_per_s": 2.0}}}, open(path, "w"))
print("started the slow stage", flush=True)
time.sleep(60)
"""


def test_a_stage_that_overruns_is_killed_and_one_that_crashes_is_failed(tmp_path, monkeypatch):
    tag = gpu_common.header(torch.device("cpu"), tiny=True, command="")["device_tag"]
    pids = tmp_path / "pids"
    stale = tmp_path / f"cache-encode_{tag}.json"
    stale.write_text(json.dumps({"status": "ok"}))  # an earlier run's file
    commands = {"cache-forward": [sys.executable, "-c", textwrap.dedent(SLOW_STAGE),
                                  str(tmp_path / f"cache-forward_{tag}.json"), str(pids)],
                "cache-encode": [sys.executable, "-c", "print('boom'); raise SystemExit(3)"]}
    monkeypatch.setattr(gpu, "stage_command", lambda name, args: commands[name])
    start = time.monotonic()
    status = gpu.main([*RUN, "--out-dir", str(tmp_path), "--stages", "cache-forward", "cache-encode",
                       "--stage-budget", "cache-forward=1", "--margin-s", "2"])
    assert status == 1 and time.monotonic() - start < 30
    summary = load(tmp_path, "bench-gpu")
    assert summary["timed_out"] == ["cache-forward"] and summary["failed"] == ["cache-encode"]
    assert summary["exit_status"] == 1 and summary["stages"]["cache-forward"]["timeout_s"] == 3
    forward = load(tmp_path, "cache-forward")
    assert forward["status"] == "timed_out" and "killed after 3 s" in forward["reason"]
    assert forward["parts"]["views1_eager"]["status"] == "ok"  # what it had finished is kept
    assert "started the slow stage" in forward["log_tail"] and forward["wall_s"] >= 3
    child = int(pids.read_text())
    for _ in range(50):  # its whole process group was killed
        if not alive(child):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the stage's child process {child} is still running")
    encode = load(tmp_path, "cache-encode")
    assert encode["status"] == "failed" and "exit status 3" in encode["error"] and "boom" in encode["log_tail"]
    assert encode["device_tag"] == tag and encode["command"].startswith("python -m cache_teacher.bench_gpu")


def test_a_stage_without_time_skips_every_part(tmp_path):
    assert train_stages.main(["--stage", "train-8b", *RUN, "--out-dir", str(tmp_path), "--budget-s", "0"]) == 0
    large = load(tmp_path, "train-8b")
    assert large["status"] == "skipped_time" and {p["status"] for p in large["parts"].values()} == {"skipped_time"}
    assert large["budget_s"] == 0 and large["command"].endswith("--budget-s 0")
    assert "run_command" not in large


def test_a_part_waits_for_the_time_of_the_longest_part_so_far():
    saved = []
    run = gpu_common.StageRun(0.2, torch.device("cpu"), checkpoint=lambda parts: saved.append(set(parts)))
    run.run("slow", lambda: time.sleep(0.15) or {})
    assert run.run("next", dict) is None and run.parts["next"]["status"] == "skipped_time"
    assert run.status() == "partial" and saved == [{"slow"}, {"slow", "next"}]


def test_device_tag_and_refusals(tmp_path):
    assert gpu_common.device_tag("NVIDIA H200") == "nvidia-h200"
    assert gpu_common.device_tag("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    with pytest.raises(SystemExit):
        gpu.main(["--device", "cpu"])  # real sizes on the CPU
    with pytest.raises(SystemExit):
        gpu.main(["--tiny", "--stage-budget", "nothing=3"])
    with pytest.raises(SystemExit):
        cache_stages.main(["--stage", "cache-forward", "--device", "cpu", "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit):  # each job runs its own stages only
        cache_stages.main(["--stage", "train-1b", *RUN, "--out-dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())


@pytest.fixture
def one_thread():
    """Tiny matmuls run faster on one thread of a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_forward_flops_count_every_matmul(one_thread):
    config = gpu_common.tiny_config(4)
    model = AutoModelForImageTextToText.from_config(config, attn_implementation="eager").eval()
    for views in (1, 6):
        inputs = cache_bench.synthetic_inputs(config, 1, views, torch.float32)[0]
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(**inputs)
        assert cache_stages.forward_flops(config, inputs["input_ids"].shape[1], views) == counter.get_total_flops()
    assert 29e12 < cache_stages.forward_flops(real_config("InternVL3-8B"), 1734, 6) < 31e12


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the tiny run on the GPU's code paths)")
def test_tiny_run_on_the_gpu(tmp_path):
    """Every stage as its own process, at tiny shapes on the GPU."""
    assert gpu.main(["--device", "cuda", "--tiny", "--out-dir", str(tmp_path)]) == 0
    summary = load(tmp_path, "bench-gpu")
    assert summary["cuda"] and summary["failed"] == summary["timed_out"] == []
    assert load(tmp_path, "cache-forward")["parts"]["views6_capture"]["memory_kind"] == "cuda_max_memory_allocated"
