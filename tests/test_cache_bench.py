"""The cache benchmark's code paths on CPU (the real-shape run needs a GPU; its inputs are checked here)."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from cache_teacher import bench
from pipeline.measure.results import GIB
from pipeline.models.load import load_model
from pipeline.models.shapes import real_config


def test_synthetic_real_shape_inputs_run_through_a_model(tiny_models):
    model = load_model(tiny_models["internvl", "teacher"]).eval()
    items = bench.synthetic_inputs(model.config, 2, 6, torch.float32)
    assert (items[0]["input_ids"] == model.config.image_token_id).sum() == 6 * model.config.image_seq_length
    with torch.no_grad():
        model(**items[0])
    real = real_config("InternVL3-8B")
    assert real.image_seq_length == 256 and real.vision_config.image_size[0] == 448


def test_cpu_benchmark_writes_its_figures(tmp_path):
    out = tmp_path / "cache.json"
    bench.main(["--samples", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    for mode in ("capture", "eager_output_attentions"):  # 2 samples: the second one alone is timed (steady)
        figures = result[mode]
        assert figures["samples_per_s"] == pytest.approx(1 / figures["median_s"], rel=1e-9)
        assert 0 < figures["median_s"] < 60 and figures["memory_kind"] == "cpu_rss_above_start"
    assert result["speedup"] == result["capture"]["samples_per_s"] / result["eager_output_attentions"]["samples_per_s"]
    assert result["seq_len"] > 6 * 49  # six tiny 49-token views plus the text
    for signal in ("first_tv", "penult_tv", "mid"):
        assert result["storage"][signal]["quant"]["max_rel_frobenius_error"] < 0.01
        assert result["storage"][signal]["lossless"]["ratio_vs_raw_fp16_full"] > 1


@pytest.mark.parametrize("family", ["internvl", "qwen2_5_vl"])
def test_memory_estimate_of_the_cache_forward(tiny_models, family):
    config = AutoConfig.from_pretrained(tiny_models[family, "teacher"])
    fake = bench.estimate_teacher_memory(config, views=2, batch_sizes=[1, 2])
    assert fake == bench.estimate_teacher_memory(config, views=2, batch_sizes=[1, 2], fake=False)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    tensors = [*model.parameters(), *model.buffers()]
    assert fake["weights_gib"] * GIB == sum(t.numel() * t.element_size() for t in tensors)
    peaks = fake["capture_peak_gib"]
    assert fake["weights_gib"] < peaks["1"] < peaks["2"] < fake["eager_output_attentions_peak_gib"] * 2
    assert fake["eager_output_attentions_peak_gib"] > peaks["1"]  # every layer's probabilities vs the plan's maps
    assert fake["captured_layers"] == config.get_text_config().num_hidden_layers - 1


def test_estimate_memory_command(tmp_path, tiny_models):
    out = tmp_path / "estimate.json"
    teacher = str(tiny_models["internvl", "teacher"])
    bench.main(["--estimate-memory", teacher, "--views", "1", "--batch-sizes", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert set(result["teachers"]) == {teacher} and "not a measurement" in result["method"]
    assert set(result["teachers"][teacher]["capture_peak_gib"]) == {"1"}
