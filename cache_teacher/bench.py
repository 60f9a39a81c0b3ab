"""Benchmark of the teacher-cache job: capture vs eager forward, and bytes per sample per codec.

    python -m cache_teacher.bench                         # CPU, tiny teacher, generated 6-view samples
    python -m cache_teacher.bench --teacher models/demo-teacher --data data/shards
    python -m cache_teacher.bench --real-shape InternVL3-8B   # GPU: random weights, real shapes
    python -m cache_teacher.bench --estimate-memory InternVL3-8B InternVL3-38B   # no GPU: estimated peaks

Writes ``benchmarks/results/cache_<device>.json``. Speed and memory figures do not depend on weight
values; storage figures do (attention sparsity), so they are reported for the teacher measured and
for the synthetic calibration maps of ``pipeline.cache_codecs`` separately.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cache_teacher.worker import capture_layers, signal_plan, slice_sample
from pipeline.attention.capture import AttentionCapture, enable_capture
from pipeline.attention.layout import build_layout
from pipeline.attention.maps import tril_to_dense
from pipeline.cache.codecs import CODECS, get_codec, measure, synthetic_causal_attention
from pipeline.data.demo import vocabulary_corpus
from pipeline.data.shards import iter_samples
from pipeline.evaluation.efficiency import synthetic_inputs as efficiency_inputs
from pipeline.measure.memory_trace import METHOD, fake_trace
from pipeline.measure.results import GIB, PeakMemory, device_name, write_results
from pipeline.models.load import load_model
from pipeline.models.processors import load_processor
from pipeline.models.shapes import real_config, shape_config
from pipeline.models.tiny import build_tiny


def _time_forwards(model, inputs: list[dict], device, layers, mode: str) -> dict:
    durations = []
    with PeakMemory(device) as mem, torch.no_grad():
        for item in inputs:
            batch = {k: v.to(device) for k, v in item.items()}
            start = time.perf_counter()
            if mode == "capture":
                with AttentionCapture(model, layers):
                    model(**batch)
            else:
                model(**batch, output_attentions=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            durations.append(time.perf_counter() - start)
    steady = durations[1:] or durations
    return {"samples_per_s": 1.0 / statistics.mean(steady), "median_s": statistics.median(steady),
            "peak_memory_gib": mem.read_gib(), "memory_kind": mem.kind}


def synthetic_inputs(config, n: int, views: int, dtype: torch.dtype) -> list[dict]:
    """Real-shape inputs of an InternVL or Qwen2.5-VL config (``pipeline.efficiency.synthetic_inputs``):
    20 text tokens, ``views`` image spans, 160 question/answer tokens, random pixels in ``dtype``
    (token values do not change the cost)."""
    g = torch.Generator().manual_seed(0)
    items = []
    for _ in range(n):
        item = efficiency_inputs(config, views=views, generator=g, text_tokens=(20, 160, 0))
        items.append({**item, "pixel_values": item["pixel_values"].to(dtype)})
    return items


def _tiny_setup(workdir: Path, samples: int):
    from pipeline.data.demo import generate
    from pipeline.data.ingest import ingest

    generate(workdir / "demo", samples=samples, seed=7, views="6")
    ingest(workdir / "demo" / "qa.json", workdir / "demo", workdir / "shards", shard_size=samples)
    return build_tiny("internvl", "teacher", workdir / "teacher", corpus=vocabulary_corpus()), workdir / "shards"


def storage_figures(model, processor, samples, plan, device) -> dict:
    """Bytes per sample per signal and codec vs raw float16 full S x S maps, with relative errors."""
    blocks: dict[str, list[np.ndarray]] = {name: [] for name in plan}
    for sample in samples:
        lay = build_layout(sample.record, sample.images, processor)
        with torch.no_grad(), AttentionCapture(model, capture_layers(plan)) as cap:
            model(**{k: v.to(device) for k, v in lay.model_inputs.items()})
        sliced = slice_sample({k: v[0] for k, v in cap.maps.items()}, lay.is_vision, plan)
        for name, block in sliced.items():
            maps = [block] if name != "mid" else [tril_to_dense(torch.from_numpy(r), lay.seq_len).numpy() for r in block]
            blocks[name].append((maps, lay.seq_len))
    out = {}
    for name, per_sample in blocks.items():
        causal = name == "mid"
        maps = [m for sample_maps, _ in per_sample for m in sample_maps]
        raw_full = sum(2 * s * s * len(m) for m, s in per_sample)
        out[name] = {}
        for codec_name in CODECS:
            result = measure(get_codec(codec_name), maps, causal=causal)
            out[name][codec_name] = {"bytes_per_sample": result["bytes_stored"] / len(per_sample),
                                     "raw_fp16_full_bytes_per_sample": raw_full / len(per_sample),
                                     "ratio_vs_raw_fp16_full": raw_full / max(result["bytes_stored"], 1),
                                     "max_rel_frobenius_error": result["rel_error"]}
    return out


def synthetic_storage(size: int = 1800) -> dict:
    maps = [synthetic_causal_attention(size, 6, seed)[0] for seed in range(2)]
    return {name: {k: measure(get_codec(name), maps)[k] for k in ("ratio", "rel_error")} for name in CODECS}


def estimate_teacher_memory(config, *, views: int, batch_sizes: list[int], fake: bool = True) -> dict:
    """Peak memory of the cache job's forward (bf16, attention captured at the default plan's layers)
    per batch size, and of the eager ``output_attentions`` baseline at batch 1, traced on fake tensors
    (``pipeline.memory_trace``). ``config``: a transformers config of the teacher."""
    from transformers import AutoModelForImageTextToText

    sample = synthetic_inputs(config, 1, views, torch.bfloat16)[0]
    layers = capture_layers(signal_plan(config.get_text_config().num_hidden_layers, ["first_tv", "penult_tv", "mid"]))
    with fake_trace(fake) as tracker:
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16).eval()
        result = {"weights_gib": tracker.live / GIB, "seq_len": int(sample["input_ids"].shape[1]),
                  "captured_layers": len(layers), "capture_peak_gib": {}}
        enable_capture(model)
        for size in batch_sizes:
            tracker.reset_peak()
            batch = {k: torch.cat([v] * size) for k, v in sample.items()}
            with torch.no_grad(), AttentionCapture(model, layers):
                model(**batch)
            del batch
            result["capture_peak_gib"][str(size)] = tracker.peak / GIB
        model.set_attn_implementation({"text_config": "eager"})
        tracker.reset_peak()
        with torch.no_grad():
            attentions = model(**sample, output_attentions=True).attentions
        del attentions
        result["eager_output_attentions_peak_gib"] = tracker.peak / GIB
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m cache_teacher.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", help="teacher directory (default: a tiny random teacher)")
    p.add_argument("--data", help="shards directory (default: generated 6-view samples)")
    p.add_argument("--real-shape", help="random-initialised real-size model, e.g. InternVL3-8B (GPU)")
    p.add_argument("--estimate-memory", nargs="+", metavar="TEACHER",
                   help="no device needed: estimated peak GPU memory of the cache forward for these real-size "
                        "names or model directories (pipeline.memory_trace); writes "
                        "benchmarks/results/cache_memory-estimate.json")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4], help="batch sizes of --estimate-memory")
    p.add_argument("--samples", type=int, default=6)
    p.add_argument("--views", type=int, default=6)
    p.add_argument("--out", help="results JSON (default benchmarks/results/cache_<device>.json)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {"device": device_name(), "machine": platform.node(), "torch": torch.__version__,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": "python -m cache_teacher.bench "
              + " ".join(argv if argv is not None else sys.argv[1:])}
    if args.estimate_memory:
        result.update({"views": args.views, "method": METHOD, "teachers": {}})
        for name in args.estimate_memory:
            result["teachers"][name] = estimate_teacher_memory(shape_config(name), views=args.views,
                                                               batch_sizes=args.batch_sizes)
            print(name, result["teachers"][name], file=sys.stderr)
        write_results(result, "cache", args.out or "benchmarks/results/cache_memory-estimate.json")
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.real_shape:
            if device.type != "cuda":
                raise SystemExit("--real-shape needs a GPU: a real-size teacher does not fit a CPU benchmark")
            from transformers import AutoModelForImageTextToText

            config = real_config(args.real_shape)
            model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16).to(device).eval()
            inputs = synthetic_inputs(config, args.samples, args.views, torch.bfloat16)
            samples, processor = None, None
        else:
            teacher, data = (args.teacher, args.data) if args.teacher else _tiny_setup(Path(tmp), args.samples)
            model = load_model(teacher).to(device).eval()
            processor = load_processor(teacher)
            samples = list(iter_samples(data))[: args.samples]
            inputs = [build_layout(s.record, s.images, processor).model_inputs for s in samples]
        result["model"] = args.real_shape or str(args.teacher or "tiny internvl teacher")
        n_layers = model.config.get_text_config().num_hidden_layers
        plan = signal_plan(n_layers, ["first_tv", "penult_tv", "mid"])
        layers = capture_layers(plan)
        result["seq_len"] = statistics.mean(int(x["input_ids"].shape[1]) for x in inputs)
        model.set_attn_implementation({"text_config": "eager"})  # the baseline: every LM layer materialises
        result["eager_output_attentions"] = _time_forwards(model, inputs, device, layers, "eager")
        enable_capture(model)
        result["capture"] = _time_forwards(model, inputs, device, layers, "capture")
        result["speedup"] = result["capture"]["samples_per_s"] / result["eager_output_attentions"]["samples_per_s"]
        if samples is not None:
            result["storage"] = storage_figures(model, processor, samples, plan, device)
    result["storage_synthetic_S1800"] = synthetic_storage()
    write_results(result, "cache", args.out)


if __name__ == "__main__":
    main()
