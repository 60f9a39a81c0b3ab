"""Deployment metrics (pipeline/efficiency.py): report fields on CPU with tiny models, the real-shape inputs.

Timings are machine-dependent: the tests check that figures exist and are positive, never thresholds.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.evaluation.efficiency import (
    EfficiencyConfig,
    measure,
    processor_prompts,
    synthetic_inputs,
    time_generation,
)
from pipeline.measure.results import GIB
from pipeline.models.load import load_model
from pipeline.models.processors import load_processor
from pipeline.models.shapes import real_config

REPO = Path(__file__).resolve().parents[1]
TINY_VISION_TOKENS = 49  # pipeline.models.TINY_IMAGE_SIZE 112, patch 8, 2x2 merge


def test_cli_reports_every_field_with_sane_values(tiny_models, tmp_path):
    out = tmp_path / "efficiency.json"
    command = [sys.executable, "-m", "pipeline.evaluate", "--efficiency", "--model",
               str(tiny_models["internvl", "student"]), "--prompts", "2", "--max-new-tokens", "4",
               "--device", "cpu", "--out", str(out)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "tokens/s" in result.stdout

    report = json.loads(out.read_text())
    assert (report["format"], report["version"], report["real_shape"]) == ("drive-kd/efficiency", 2, False)
    assert report["device"]["kind"] == "cpu" and report["device"]["name"]
    assert (report["dtype"], report["memory_kind"]) == ("fp32", "cpu_rss_above_start")
    weights = sum(f.stat().st_size for f in Path(tiny_models["internvl", "student"]).glob("*.safetensors"))
    assert report["peak_memory_gib"] * GIB >= weights  # the fp32 weights were loaded inside the measured span
    assert report["tokens_per_s"] > 0 and report["decode_tokens_per_s"] > 0 and report["ttft_median_s"] > 0
    assert [run["new_tokens"] for run in report["per_prompt"]] == [4, 4]  # end-of-sequence is suppressed
    shapes = report["shapes"]
    assert (shapes["prompts"], shapes["views"], shapes["batch_size"]) == (2, 1, 1)
    assert shapes["vision_tokens_per_prompt"] == TINY_VISION_TOKENS
    assert shapes["parameters"] > 0 and shapes["text_layers"] == 4
    assert report["model"] == str(tiny_models["internvl", "student"])


def test_six_view_measure_in_process(tiny_models):
    report = measure(EfficiencyConfig(model=str(tiny_models["qwen2_5_vl", "student"]), prompts=1,
                                      max_new_tokens=3, views=6, device="cpu"))
    assert report["shapes"]["vision_tokens_per_prompt"] == 6 * TINY_VISION_TOKENS
    assert report["per_prompt"][0]["new_tokens"] == 3 and report["ttft_median_s"] > 0


def test_prompt_set_is_deterministic(tiny_models):
    processor = load_processor(tiny_models["internvl", "student"])
    first, second = (processor_prompts(processor, prompts=3, views=6, seed=0) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    assert not torch.equal(first[0]["pixel_values"], first[1]["pixel_values"])


@pytest.mark.parametrize(("name", "pixel_shape"), [("InternVL3-1B", (6, 3, 448, 448)),
                                                    ("Qwen2.5-VL-3B-Instruct", (6 * 32 * 32, 1176))])
def test_real_shape_inputs_have_the_real_layout(name, pixel_shape):
    config = real_config(name)
    inputs = synthetic_inputs(config, views=6, generator=torch.Generator().manual_seed(0))
    ids = inputs["input_ids"][0]
    assert int((ids == config.image_token_id).sum()) == 6 * 256  # 256 vision tokens per 448 px tile
    assert tuple(inputs["pixel_values"].shape) == pixel_shape
    if name.startswith("Qwen"):
        starts = torch.nonzero(ids == config.vision_start_token_id).flatten()
        assert len(starts) == 6 and bool((ids[starts + 1] == config.image_token_id).all())
        assert torch.equal(inputs["mm_token_type_ids"][0].bool(), ids == config.image_token_id)


@pytest.mark.parametrize("family", ["internvl", "qwen2_5_vl"])
def test_real_shape_inputs_run_through_the_model(tiny_models, family):
    """The random-id layout is accepted by the architecture (checked on the tiny model of the family)."""
    model = load_model(tiny_models[family, "student"]).eval()
    inputs = synthetic_inputs(model.config, views=1, generator=torch.Generator().manual_seed(0))
    run = time_generation(model, inputs, max_new_tokens=3, sync=lambda: None)
    assert run["new_tokens"] == 3 and run["ttft_s"] > 0


def test_real_shape_on_cpu_needs_allow_cpu():
    with pytest.raises(ValueError, match="--real-shape InternVL3-1B .* pass --allow-cpu"):
        EfficiencyConfig(real_shape="InternVL3-1B", device="cpu")
    assert EfficiencyConfig(real_shape="InternVL3-1B", device="cpu", allow_cpu=True).dtype == "fp32"


def test_config_reports_every_problem():
    with pytest.raises(ValueError) as error:
        EfficiencyConfig(model="m", real_shape="GPT-9", views=3, prompts=0)
    message = str(error.value)
    assert "exactly one of --model DIR and --real-shape NAME" in message and "no real-size config for 'GPT-9'" in message
    assert "views must be 1 or 6" in message and "prompts must be >= 1" in message


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: builds a full-size InternVL3-1B")
def test_real_shape_benchmark_on_gpu():
    report = measure(EfficiencyConfig(real_shape="InternVL3-1B", prompts=2, max_new_tokens=16, views=6))
    assert report["memory_kind"] == "cuda_max_memory_allocated" and report["peak_memory_gib"] > 1.0
    assert report["shapes"]["vision_tokens_per_prompt"] == 6 * 256 and report["tokens_per_s"] > 0
