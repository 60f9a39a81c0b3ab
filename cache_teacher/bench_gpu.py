"""The cache job's stages of ``make bench-gpu`` (``pipeline.measure.gpu`` runs them; one stage per call).

    python -m cache_teacher.bench_gpu --stage cache-forward --device cuda --out-dir D [--budget-s 75] [--tiny]
    python -m cache_teacher.bench_gpu --stage cache-encode --device cuda --out-dir D [--budget-s 60] [--tiny]

  cache-forward  InternVL3-8B teacher, bf16, 1 and 6 views: the cache job's forward with the plan's layers
                 captured vs eager ``output_attentions`` (samples/s, median s, peak GiB), and the forward's
                 FLOPs beside the achieved TFLOP/s (cache_teacher.bench)
  cache-encode   the cache job's encode stage on the device at S = 1800, 23 and 27 maps, 6 views
                 (cache_teacher.bench.encode_stage_figures; "not_available" in a build without it)

Writes ``D/<stage>_<gpu>.json`` (``pipeline.measure.gpu_common.stage_main``); exit status 1 when the stage
failed.
"""

from __future__ import annotations

import sys

import torch
from transformers import AutoModelForImageTextToText

from cache_teacher import bench as cache_bench
from cache_teacher.worker import capture_layers, signal_plan
from pipeline.attention.capture import enable_capture
from pipeline.measure.gpu_common import Plan, StageRun, stage_main
from pipeline.models.shapes import shape_config


def time_forwards(model, inputs: list[dict], device, layers: list[int], mode: str) -> dict:
    """Adapter over ``cache_teacher.bench._time_forwards`` (private there): samples/s, median s, peak GiB."""
    return cache_bench._time_forwards(model, inputs, device, layers, mode)


def forward_flops(config, seq_len: int, views: int) -> float:
    """Matmul FLOPs (2 per multiply-add) of one batch-of-one forward of an InternVL ``config`` with
    ``views`` image tiles and ``seq_len`` tokens: decoder projections and MLP, full S x S attention
    scores and values (what eager and the capture compute), lm_head over every position, the vision
    tower (patch embedding; layers over patches + CLS per tile) and the projector."""
    text, vision = config.get_text_config(), config.vision_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    h, q, kv = text.hidden_size, text.num_attention_heads * head_dim, text.num_key_value_heads * head_dim
    layer = 2 * h * q + 2 * h * kv + 3 * h * text.intermediate_size
    lm = text.num_hidden_layers * (2 * layer * seq_len + 4 * seq_len ** 2 * q) + 2 * h * text.vocab_size * seq_len
    size = vision.image_size[0] if isinstance(vision.image_size, (list, tuple)) else vision.image_size
    patch = vision.patch_size[0] if isinstance(vision.patch_size, (list, tuple)) else vision.patch_size
    patches, vh = (size // patch) ** 2, vision.hidden_size
    tokens = patches + 1
    vit_layer = 2 * (4 * vh * vh + 2 * vh * vision.intermediate_size) * tokens + 4 * tokens ** 2 * vh
    vit = 2 * 3 * patch ** 2 * vh * patches + vision.num_hidden_layers * vit_layer
    merged = vh * round(1 / config.downsample_ratio ** 2)
    projector = 2 * config.image_seq_length * (merged * h + h * h)
    return float(lm + views * (vit + projector))


def stage_cache_forward(run: StageRun, plan: Plan, device: torch.device) -> dict:
    config = shape_config(plan.teacher)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype).eval()
    layers = capture_layers(signal_plan(config.get_text_config().num_hidden_layers, ["first_tv", "penult_tv", "mid"]))
    figures = {"teacher": plan.teacher, "dtype": str(dtype), "captured_layers": layers, "views": {}}
    for views in plan.forward_views:
        inputs = cache_bench.synthetic_inputs(config, plan.forward_samples, views, dtype)
        seq_len = int(inputs[0]["input_ids"].shape[1])
        flops = forward_flops(config, seq_len, views)
        entry = {"seq_len": seq_len, "forward_tflop": flops / 1e12}
        for mode in ("eager", "capture"):
            if mode == "eager":
                model.set_attn_implementation({"text_config": "eager"})  # every LM layer materialises
            else:
                enable_capture(model)
            result = run.run(f"views{views}_{mode}", time_forwards, model, inputs, device, layers, mode)
            if result is not None:
                run.parts[f"views{views}_{mode}"]["achieved_tflop_per_s"] = flops * result["samples_per_s"] / 1e12
                entry[f"{mode}_samples_per_s"] = result["samples_per_s"]
        if {"eager_samples_per_s", "capture_samples_per_s"} <= set(entry):
            entry["capture_speedup"] = entry["capture_samples_per_s"] / entry["eager_samples_per_s"]
        figures["views"][str(views)] = entry
    return figures


def stage_encode(run: StageRun, plan: Plan, device: torch.device) -> dict:
    encode = getattr(cache_bench, "encode_stage_figures", None)
    if encode is None:
        run.skip("encode", "not_available", "cache_teacher.bench.encode_stage_figures is not in this build "
                 "(codec v2's device-side encode stage)")
    else:
        # the default and the fast entropy stage; every stage's host figures (rans too) come from the CPU bench
        # (python -m cache_teacher.bench --encode-stage): a third stage's cold numba compile overran this budget
        for entropy in ("zstd", "context"):
            for n_maps in plan.encode_maps:
                run.run(f"maps{n_maps}_{entropy}", encode, device, size=plan.encode_size, n_maps=n_maps,
                        views=plan.encode_views, entropy=entropy)
    return {"size": plan.encode_size, "maps": list(plan.encode_maps), "views": plan.encode_views}


STAGES = {"cache-forward": stage_cache_forward, "cache-encode": stage_encode}


def main(argv: list[str] | None = None) -> int:
    return stage_main("cache_teacher.bench_gpu", STAGES, argv, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
