"""The device-free memory estimate (train_student.memory) and the trainer benchmark's in-memory paths."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig

from pipeline.measure.memory_trace import LiveBytes
from pipeline.measure.results import GIB
from pipeline.models.load import load_model
from schemas.method import LayerPlan
from train_student import bench
from train_student.memory import estimate_peak, item_bytes, per_gpu
from train_student.setup import build_trainer


def test_live_bytes_counts_each_storage_once_until_freed():
    with LiveBytes() as tracker:
        a = torch.zeros(1000)  # 4000 bytes
        assert tracker.live == 4000
        view = a.view(10, 100)  # same storage
        a.add_(1)  # in place: same storage
        assert tracker.live == 4000
        b = view * 2
        assert tracker.live == 8000
        tracker.phase = "hold"
        with tracker.hold(500):
            assert tracker.live == 8500
        del b
        assert tracker.live == 4000
        c = torch.empty(10, dtype=torch.bfloat16)
        assert tracker.live == 4020
    del a, view, c
    assert tracker.live == 0
    assert tracker.peak == 8500 and tracker.peak_phase == "hold"


@pytest.fixture(scope="module")
def tiny_student(tiny_models):
    config = AutoConfig.from_pretrained(tiny_models["internvl", "student"])
    k = len(LayerPlan.for_model(config.get_text_config().num_hidden_layers).mid)
    items = bench.synthetic_items(config, n=2, views=1, k=k, question=12, answer=4)
    return config, items


def train_config(name: str, **model):
    overrides = dict(dict(bench.cached_modes(True))[name])
    overrides = {**overrides, "model": {**overrides.get("model", {}), "precision": "bf16", **model},
                 "optim": {"grad_accum": 2}}
    return bench.mode_config(name, overrides)


@pytest.mark.parametrize("name", ["drive_kd_agp", "drive_kd_agp_bf16_bank_frozen_vision_recompute_checkpointing"])
def test_fake_trace_equals_the_same_trace_on_real_tensors(tiny_student, name):
    config, items = tiny_student
    fake = estimate_peak(config, train_config(name), items)
    real = estimate_peak(config, train_config(name), items, fake=False)
    assert fake == real
    assert fake["setup_gib"] < fake["after_step_gib"] < fake["peak_gib"]
    assert fake["peak_phase"] in ("micro-step", "optimizer step")


def test_estimate_follows_the_options(tiny_student):
    config, items = tiny_student
    fp32 = estimate_peak(config, train_config("drive_kd_agp"), items)
    bf16 = estimate_peak(config, train_config("drive_kd_agp_bf16_bank"), items)
    sft = estimate_peak(config, train_config("sft"), items)
    params = fp32["trainable_params"]
    rows = 1 + 3  # CE and the three distillation terms
    assert (fp32["setup_gib"] - bf16["setup_gib"]) * GIB == pytest.approx(rows * params * 2, abs=64)
    # SFT keeps no bank: its setup is the fp32 model; its peak is below Drive-KD's
    assert sft["setup_gib"] * GIB == pytest.approx(params * 4, rel=0.01)
    # the optimizer step adds AdamW's two fp32 moments per trainable parameter
    for estimate in (fp32, sft):
        assert (estimate["after_step_gib"] - estimate["setup_gib"]) * GIB == pytest.approx(params * 8, rel=0.01)
    assert sft["peak_gib"] < bf16["peak_gib"] < fp32["peak_gib"]
    frozen = estimate_peak(config, train_config("drive_kd_agp", freeze_vision=True), items)
    assert frozen["trainable_params"] < params and frozen["peak_gib"] < fp32["peak_gib"]


def test_bench_and_estimate_use_the_trainers_optimizer_and_schedule(tiny_models):
    """build_trainer (train_student.setup) reads every optim field, as python -m train_student does."""
    config = bench.mode_config("drive_kd_agp", {"optim": {"lr": 1e-3, "betas": [0.8, 0.95], "weight_decay": 0.1,
                                                          "lr_floor": 0.2, "warmup_steps": 0}})
    model = load_model(tiny_models["internvl", "student"])
    plan = LayerPlan.for_model(model.config.get_text_config().num_hidden_layers)
    parts = build_trainer(config, model, plan, torch.device("cpu"), total_steps=2)
    group = parts.optimizer.param_groups[0]
    assert (group["betas"], group["weight_decay"]) == ((0.8, 0.95), 0.1)
    assert parts.reweighter is not None and parts.generator is not None  # AGP and reweighting on by default
    for _ in range(2):
        parts.optimizer.step()
        parts.scheduler.step()
    assert parts.scheduler.get_last_lr()[0] == pytest.approx(0.2 * 1e-3)  # the configured floor, not 0.01


def test_item_bytes_counts_inputs_targets_and_labels(tiny_student):
    _, items = tiny_student
    item = items[0]
    expected = sum(t.numel() * t.element_size() for t in (*item.inputs.values(), *item.targets.values()))
    assert item_bytes(item) == expected + item.labels.numel() * 8


def test_online_teacher_is_not_estimable(tiny_student):
    config, items = tiny_student
    with pytest.raises(ValueError, match="online-teacher"):
        estimate_peak(config, bench.mode_config("online_teacher", {"model": {"online_teacher": "x"}}), items)


def test_estimate_memory_command_writes_every_option(tiny_models, tmp_path, monkeypatch):
    out = tmp_path / "estimate.json"
    monkeypatch.setattr(bench, "cached_modes", lambda extra: [(n, bench.MODES[n][1]) for n in ("sft", "drive_kd_agp")])
    bench.main(["--estimate-memory", "--student-shape", str(tiny_models["internvl", "student"]), "--views", "1",
                "--out", str(out), "--world-size", "1", "4", "--parallel", "none", "ddp", "fsdp"])
    result = json.loads(out.read_text())
    assert set(result["modes"]) == {"sft", "drive_kd_agp"} == set(result["under_24gb"]) == set(result["per_gpu"])
    assert "estimate, not a measurement" in result["method"]
    assert result["modes"]["sft"]["peak_gib"] < result["modes"]["drive_kd_agp"]["peak_gib"]
    agp = result["per_gpu"]["drive_kd_agp"]
    assert set(agp["none"]) == {"1"} and set(agp["ddp"]) == set(agp["fsdp"]) == {"1", "4"}
    assert agp["none"]["1"] == agp["ddp"]["4"] == agp["ddp"]["1"]  # a replica per GPU
    assert agp["fsdp"]["4"]["peak_gib"] < agp["ddp"]["4"]["peak_gib"]


def test_per_gpu_shards_the_persistent_state_under_fsdp():
    gib = 2 ** 30
    estimate = {"phase_peaks_gib": {"micro-step": 40.0, "optimizer step": 24.0}, "weights_gib": 4.0, "setup_gib": 20.0,
                "after_step_gib": 28.0, "trainable_params": gib // 4,  # bank 16, optimizer 8, gradient 1 GiB
                "decoder_weights_gib": 3.0, "decoder_layers": 4}
    assert per_gpu(estimate, world_size=8, parallel="ddp", plain=False) == {"peak_gib": 40.0, "peak_phase": "micro-step"}
    assert per_gpu(estimate, world_size=8, parallel="ddp", plain=True)["peak_gib"] == 40.0
    # 40 + 4/8 - (8 + 16 + 1) * 7/8 = 18.625 during the micro-steps; the optimizer step on shards: 24 / 8
    assert per_gpu(estimate, world_size=8, parallel="fsdp", plain=False) == {"peak_gib": 18.625,
                                                                             "peak_phase": "micro-step"}
    assert per_gpu(estimate, world_size=1, parallel="fsdp", plain=False)["peak_gib"] == 44.0  # + the unsharded copy
    # one backward per micro-step: the root's weights (1) and two of the four layers (1.5) unsharded
    assert per_gpu(estimate, world_size=8, parallel="fsdp", plain=True)["peak_gib"] == 40 + 2.5 - 3.5 - 25 * 7 / 8


def test_synthetic_benchmark_runs_every_mode_on_cpu(tiny_models):
    """The GPU benchmark's in-memory path (real-shape configs there) on the tiny model directories."""
    class Args:
        student_shape = str(tiny_models["internvl", "student"])
        teacher_shape = str(tiny_models["internvl", "teacher"])
        views, warmup, steps = 1, 0, 1

    result = bench.run_synthetic(Args, torch.device("cpu"))
    assert set(result["modes"]) == {"sft", "drive_kd_agp", "drive_kd_no_agp", "online_teacher"}
    modes = result["modes"]
    assert all(m["optimizer_steps_timed"] == 1 and 0 < m["samples_per_s"] < 1e4 for m in modes.values())
    bench.summarise(result, torch.device("cpu"))
    assert set(result["targets"]) == {"cached_at_least_4x_online", "agp_at_most_2.5x_sft"}
    assert result["ratios"]["drive_kd_agp_step_cost_vs_sft"] == (modes["sft"]["samples_per_s"]
                                                                 / modes["drive_kd_agp"]["samples_per_s"])
