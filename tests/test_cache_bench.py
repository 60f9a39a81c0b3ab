"""The cache benchmark's code paths on CPU (the real-shape run needs a GPU; its inputs are checked here)."""

import json

import torch

from cache_teacher import bench
from pipeline.models import load_model, real_config


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
    assert result["capture"]["samples_per_s"] > 0 and result["eager_output_attentions"]["samples_per_s"] > 0
    for signal in ("first_tv", "penult_tv", "mid"):
        assert result["storage"][signal]["quant"]["max_rel_frobenius_error"] < 0.01
        assert result["storage"][signal]["lossless"]["ratio_vs_raw_fp16_full"] > 1
