"""The cache benchmark's code paths on CPU (the real-shape run needs a GPU; its inputs are checked here)."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from cache_teacher import bench
from pipeline.cache.codecs import synthetic_causal_attention
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


def test_encode_stage_figures_on_the_cpu():
    figures = bench.encode_stage_figures("cpu", size=160, n_maps=3, views=1, threads=2)
    assert figures["mid_maps"] == 3 and figures["device"] == "cpu"
    assert figures["entries"] == 3 * 160 * 161 // 2 + 2 * figures["entries_tv_block"]
    assert figures["codes_bytes_to_host"] <= 2 * figures["entries"]  # 1-2 bytes per entry cross to the host
    assert 0 < figures["bytes_stored"] < figures["codes_bytes_to_host"] / 3
    assert figures["host_encode_core_s"] > 0 and figures["host_decode_core_s"] > 0
    assert len(figures["host_decode_core_s_repeats"]) == len(figures["host_read_core_s_repeats"]) == 5
    assert figures["host_read_core_s_median"] > 0 and "host_read_core_s_median<=0.1" in figures["targets"]
    assert figures["teacher_forward_s_estimate_8b_h100_40pct"] > 0.005  # (2 x 7B x 160 + one tile) FLOPs at 400 TFLOP/s


def test_encode_stage_figures_on_given_maps():
    """--encode-stage --real-maps: the sample is built from the given per-layer maps (mid = layers 1..n, the
    text-to-vision blocks of layers 0 and L-2), whatever made them."""
    maps = np.stack([synthetic_causal_attention(160, 1, seed=layer, span_len=40, n_heads=2)[0] for layer in range(5)])
    figures = bench.encode_stage_figures("cpu", n_maps=3, views=1, threads=2, entropy="tans", real=maps, repeats=2)
    assert figures["maps"] == "real" and figures["seq_len"] == 160 and figures["mid_maps"] == 3
    assert figures["entries_tv_block"] == (160 - 120) * 120  # vision-like positions [20, 140), text rows
    assert figures["entries"] == 3 * 160 * 161 // 2 + 2 * figures["entries_tv_block"]
    assert 0 < figures["bytes_stored"] < figures["codes_bytes_to_host"]
    with pytest.raises(ValueError, match="5 mid maps need a model of >= 7 layers"):
        bench.encode_stage_figures("cpu", n_maps=5, views=1, real=maps)


def test_encode_stage_real_maps_command(tmp_path, monkeypatch):
    """--encode-stage --real-maps: one sample per text and map count from smollm2_maps at S = --size (here a
    stand-in returning generated maps of 29 layers, the fewest that 27 mid maps need)."""
    def maps(size, texts):
        return [np.stack([synthetic_causal_attention(size, 1, seed=layer, span_len=20, n_heads=1)[0]
                          for layer in range(29)]) for _ in range(texts)]

    monkeypatch.setattr(bench, "smollm2_maps", maps)
    out = tmp_path / "real.json"
    bench.main(["--encode-stage", "--real-maps", "--entropy", "tans", "--size", "64", "--views", "1", "--texts",
                "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert set(result["samples"]) == {f"{n}_tans_text{t}" for n in (23, 27) for t in (0, 1)}
    assert all(s["maps"] == "real" and s["seq_len"] == 64 for s in result["samples"].values())
    assert result["samples"]["27_tans_text0"]["entries"] > result["samples"]["23_tans_text0"]["entries"]


def test_real_map_figures_on_generated_maps():
    pytest.importorskip("imagecodecs", reason="the entropy-stage candidates need the bench extra (imagecodecs)")
    per_text = [np.stack([synthetic_causal_attention(96, 1, seed=t * 3 + layer, span_len=40, n_heads=2)[0]
                          for layer in range(3)]) for t in range(2)]
    result = bench.real_map_figures(per_text)
    assert result["layers"] == 3 and result["tv_block"] == {"rows": 32, "cols": 64, "layers": [0, 1]}
    for name, figures in result["causal"].items():
        assert figures["maps"] == 6 and len(figures["ratio_per_layer"]) == 3
        bound = {"lossless": 1e-3, "log8": 0.05}.get(name, 0.0099)
        assert figures["max_per_map_rel_error"] <= bound, name
        assert figures["encode_mb_per_core_s"] > 0
    sink = result["causal"]["quant2_sink"]
    assert sink["max_per_map_rel_error_without_first_column"] <= 0.0099
    assert result["causal"]["quant2"]["max_per_map_rel_error_without_first_column"] > 0.0099  # why sink exists
    assert result["causal"]["quant2"]["ratio_vs_raw_fp16_triangle"] > result["causal"]["quant"]["ratio_vs_raw_fp16_triangle"]
    assert result["text_to_vision"]["quant2"]["maps"] == 4
    assert set(result["entropy_stage_candidates"]) >= {"jpeg-ls", "jpeg-xl_e1", "context-model (quant2)"}
    tv = result["text_to_vision_candidates"]
    line = list(tv["quant2_tans_ratio_vs_raw_fp16_block_by_rel_error"].values())
    assert len(line) == len(bench.TV_ERRORS) and line == sorted(line)  # a looser bound stores less
    assert tv["jpeg-xl_e9_lossless_on_quant2_codes_ratio_vs_raw_fp16_block"] > 1
