"""Check a checkpoint before GPU hours are spent on it: family, shapes, layouts, digests, one capture, memory.

``check_model`` returns a JSON-friendly report; ``render`` prints it. Every problem a real checkpoint
is known to have (remote-code InternVL, another family, a tokenizer without the image tokens, teacher
and student layouts that differ) stops with an error naming the directory and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from pipeline.attention.capture import AttentionCapture, enable_capture
from pipeline.attention.layout import Layout, build_layout, default_tiling
from pipeline.data.shards import iter_samples
from pipeline.measure.memory_trace import METHOD, fake_trace
from pipeline.measure.results import GIB
from pipeline.models.load import load_model
from pipeline.models.processors import FAMILY_SPECIALS, family_of, image_backend, load_processor
from pipeline.models.shapes import shape_config
from schemas.method import TERMS, LayerPlan
from schemas.qa import ImageRef, QARecord

IMAGE_TOKENS = {
    "internvl": ("start_image_token", "end_image_token", "context_image_token"),
    "qwen2_5_vl": ("vision_start_token", "image_token", "vision_end_token"),
}
"""The special tokens (names of FAMILY_SPECIALS entries) a tokenizer of each family must hold."""

VIEWS = ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK_RIGHT", "CAM_BACK")


def check_tokenizer(model_dir: Path, family: str, processor) -> None:
    """Raise ValueError when the tokenizer lacks one of the family's image tokens as a single token."""
    vocab = processor.tokenizer.get_vocab()
    tokens = [FAMILY_SPECIALS[family][name] for name in IMAGE_TOKENS[family]]
    missing = [token for token in tokens if token not in vocab]
    if missing:
        raise ValueError(f"{model_dir}: the tokenizer has no image tokens {missing} (a {family} tokenizer needs "
                         f"{tokens}). Fix: use the tokenizer files of the checkpoint itself (tokenizer.json, "
                         "tokenizer_config.json, processor_config.json from the same Hugging Face repository).")
    config_id = getattr(shape_config(str(model_dir)), "image_token_id", None)
    if config_id is not None and config_id != processor.image_token_id:
        raise ValueError(f"{model_dir}: config.json image_token_id {config_id} differs from the tokenizer's "
                         f"{processor.image_token_id}. Fix: take config and tokenizer from the same checkpoint.")


def captured_layers(num_layers: int) -> list[int]:
    """Decoder layers the default signals capture: first, penultimate and the intermediate range 0..L-2."""
    return LayerPlan.for_model(num_layers).layers(TERMS)


def synthetic_record(n_views: int) -> tuple[QARecord, list[Image.Image]]:
    """A 1- or 6-view record on drawn 1600x900 frames, with an object reference in the answer."""
    views = VIEWS if n_views == 6 else ("CAM_FRONT",)
    images = []
    for i, _ in enumerate(views):
        image = Image.new("RGB", (1600, 900), (90, 90, 90))
        ImageDraw.Draw(image).rectangle([100 + 50 * i, 300, 600 + 50 * i, 700], fill=(220, 30, 30))
        images.append(image)
    refs = tuple(ImageRef(view=view, file="", source_path=f"samples/{view}/check.jpg") for view in views)
    record = QARecord(key=f"check-{n_views}view", capability="perception", images=refs,
                      question="<image>\n" * n_views + "What is in front of the ego vehicle?",
                      answer="A red car <c1,CAM_FRONT,0.4678,0.6772>.", source="check_model", index=0)
    return record, images


def sample_records(data: str | None) -> dict[str, tuple[QARecord, list[Image.Image]]]:
    """{"1-view": ..., "6-view": ...}: the first such samples of `data` when given, else synthetic ones."""
    found: dict[str, tuple[QARecord, list[Image.Image]]] = {}
    if data is not None:
        for sample in iter_samples(data):
            name = f"{len(sample.images)}-view"
            found.setdefault(name, (sample.record, sample.images))
            if len(found) == 2:
                break
    for n_views in (1, 6):
        found.setdefault(f"{n_views}-view", synthetic_record(n_views))
    return {name: found[name] for name in ("1-view", "6-view")}


def describe_layout(layout: Layout) -> dict[str, Any]:
    return {"key": layout.key, "S": layout.seq_len, "n_text": layout.n_text, "n_vision": layout.n_vision,
            "answer_span": list(layout.answer_span), "vision_spans": [list(span) for span in layout.vision_spans],
            "digest": layout.digest}


def capture_one(model_dir: Path, layout: Layout, layers: list[int], device: str) -> dict[str, Any]:
    """One forward in fp32 capturing head-mean maps at `layers`: their shape and largest row-sum error."""
    model = load_model(model_dir, dtype="fp32").to(device).eval()
    enable_capture(model)
    inputs = {name: value.to(device) for name, value in layout.model_inputs.items()}
    with torch.no_grad(), AttentionCapture(model, layers) as capture:
        model(**inputs)
    maps = torch.stack([capture.maps[layer][0] for layer in layers])
    row_error = (maps.sum(-1) - 1).abs().max().item()  # deliberate sync: one number for the report
    return {"device": device, "dtype": "fp32", "layers": layers, "map_shape": list(maps.shape[1:]),
            "max_row_sum_error": row_error, "finite": bool(torch.isfinite(maps).all())}


def cache_memory_estimate(model_dir: Path, layout: Layout, *, layers: list[int]) -> dict[str, Any]:
    """Peak memory of the cache forward of `layout` (bf16, batch 1, capture at `layers`) on fake tensors."""
    from transformers import AutoModelForImageTextToText

    inputs = dict(layout.model_inputs)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with fake_trace() as tracker:
        model = AutoModelForImageTextToText.from_config(shape_config(str(model_dir)), dtype=torch.bfloat16).eval()
        weights = tracker.live
        enable_capture(model)
        tracker.reset_peak()
        with torch.no_grad(), AttentionCapture(model, layers):
            model(**inputs)
        peak = tracker.peak
    return {"views": len(layout.vision_spans), "seq_len": layout.seq_len, "weights_gib": weights / GIB,
            "cache_forward_peak_gib": peak / GIB, "method": METHOD}


def model_facts(model_dir: Path) -> tuple[str, Any, dict[str, Any]]:
    """(family, processor, report section) of one checkpoint directory, checked."""
    family = family_of(model_dir)
    processor = load_processor(model_dir)
    check_tokenizer(model_dir, family, processor)
    text = shape_config(str(model_dir)).get_text_config()
    tiling = default_tiling(processor)
    facts = {"dir": str(model_dir), "family": family, "layers": text.num_hidden_layers,
             "heads": text.num_attention_heads, "kv_heads": getattr(text, "num_key_value_heads", None),
             "hidden": text.hidden_size, "tiling": tiling.describe(), "image_backend": image_backend(processor)}
    return family, processor, facts


def check_model(model_dir: str | Path, *, student: str | Path | None = None, data: str | None = None,
                device: str | None = None, capture: bool = True, memory: bool = True) -> dict[str, Any]:
    """The report of `model_dir` (and its agreement with `student`); raises ValueError on any problem."""
    model_dir = Path(model_dir)
    family, processor, facts = model_facts(model_dir)
    records = sample_records(data)
    layouts = {name: build_layout(record, images, processor) for name, (record, images) in records.items()}
    facts["vision_tokens_per_image"] = layouts["1-view"].n_vision
    report: dict[str, Any] = {"model": facts, "layouts": {name: describe_layout(lay) for name, lay in layouts.items()}}
    if student is not None:
        report["student"] = student_agreement(Path(student), family, records, layouts)
    layers = captured_layers(facts["layers"])
    if capture:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        report["capture"] = capture_one(model_dir, layouts["1-view"], layers, device)
    if memory:
        report["memory"] = cache_memory_estimate(model_dir, layouts["6-view"], layers=layers)
    return report


def student_agreement(student: Path, family: str, records, layouts: dict[str, Layout]) -> dict[str, Any]:
    """The student's facts and its digests beside the teacher's; raises ValueError when they differ."""
    student_family, processor, facts = model_facts(student)
    if student_family != family:
        raise ValueError(f"{student} is a {student_family} model, the teacher a {family} one: teacher and student "
                         "must be of one family (same tokenizer and image tiling). Fix: pick a student of the "
                         "teacher's family.")
    digests = {}
    for name, (record, images) in records.items():
        theirs = build_layout(record, images, processor)
        if theirs.digest != layouts[name].digest:
            raise ValueError(f"{name} record {record.key}: teacher layout digest {layouts[name].digest} (S "
                             f"{layouts[name].seq_len}) differs from the student's {theirs.digest} (S {theirs.seq_len})."
                             " Likely cause: a different tokenizer or chat template, or a different image tiling "
                             f"(teacher {layouts[name].tiling.describe()}, student {theirs.tiling.describe()}).")
        digests[name] = theirs.digest
    return {**facts, "digests_agree": True, "digests": digests}


def render(report: dict[str, Any]) -> str:
    """The report as readable lines."""
    model = report["model"]
    lines = [f"model {model['dir']}: {model['family']}, {model['layers']} layers, {model['heads']} heads "
             f"({model['kv_heads']} KV), hidden {model['hidden']}, image backend {model['image_backend']}",
             f"one-tile policy {model['tiling']}: {model['vision_tokens_per_image']} vision tokens per image"]
    for name, lay in report["layouts"].items():
        lines.append(f"layout {name} ({lay['key']}): S {lay['S']} ({lay['n_text']} text, {lay['n_vision']} vision), "
                     f"answer span {lay['answer_span']}, vision spans {lay['vision_spans']}, digest {lay['digest']}")
    if "student" in report:
        student = report["student"]
        lines.append(f"student {student['dir']}: {student['layers']} layers, {student['heads']} heads; layout "
                     "digests agree with the teacher's on both records")
    if "capture" in report:
        cap = report["capture"]
        lines.append(f"capture ({cap['device']}, {cap['dtype']}): {len(cap['layers'])} layers "
                     f"{cap['layers'][0]}..{cap['layers'][-1]}, maps {cap['map_shape']}, finite {cap['finite']}, "
                     f"max |row sum - 1| {cap['max_row_sum_error']:.2e}")
    if "memory" in report:
        mem = report["memory"]
        lines.append(f"cache forward, {mem['views']} views, S {mem['seq_len']}, bf16, batch 1: weights "
                     f"{mem['weights_gib']:.2f} GIB, peak {mem['cache_forward_peak_gib']:.2f} GIB ({mem['method']})")
    return "\n".join(lines)
