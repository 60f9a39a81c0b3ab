"""Capture at chosen layers equals the head mean of eager output_attentions=True."""

import pytest
import torch

from conftest import make_sample
from pipeline.capture import AttentionCapture, enable_capture
from pipeline.layout import build_layout, collate_layouts
from pipeline.models import load_model
from pipeline.processors import load_processor

FAMILIES = ("internvl", "qwen2_5_vl")


def _batch(model_dir, view_counts):
    processor = load_processor(model_dir)
    layouts = [build_layout(*make_sample(n, key=f"k{i}", question="Question " * (i + 1)), processor)
               for i, n in enumerate(view_counts)]
    batch = collate_layouts(layouts, processor.tokenizer.pad_token_id)
    return {k: v for k, v in batch.items() if k not in ("labels", "is_vision")}


def _eager_and_captured(model_dir, inputs, layers):
    eager = load_model(model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        reference = eager(**inputs, output_attentions=True)
    model = load_model(model_dir).eval()
    enable_capture(model)
    with torch.no_grad(), AttentionCapture(model, layers) as cap:
        out = model(**inputs)
    return reference, out, cap


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("view_counts", [[1], [6], [1, 6]], ids=["1view", "6view", "padded-batch"])
def test_capture_equals_eager_head_mean(tiny_models, family, view_counts):
    model_dir = tiny_models[family, "teacher"]
    inputs = _batch(model_dir, view_counts)
    layers = [0, 2, 4]  # first, an intermediate one, penultimate of the 6-layer teacher
    reference, out, cap = _eager_and_captured(model_dir, inputs, layers)
    assert out.attentions is None
    assert sorted(cap.maps) == layers
    valid = inputs["attention_mask"].bool()
    for layer in layers:
        expected = reference.attentions[layer].float().mean(dim=1)
        for b in range(len(view_counts)):
            got = cap.maps[layer][b][valid[b]][:, valid[b]]
            want = expected[b][valid[b]][:, valid[b]]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits[valid], reference.logits[valid], atol=1e-4, rtol=1e-4)


def test_capture_keeps_gradients_and_transform(tiny_models):
    model_dir = tiny_models["internvl", "student"]
    inputs = _batch(model_dir, [1])
    model = load_model(model_dir)
    enable_capture(model)
    with AttentionCapture(model, [0, -2], transform=lambda layer, m: m[:, -5:, :10]) as cap:
        model(**inputs)
    assert cap.maps[0].shape == (1, 5, 10) and sorted(cap.maps) == [0, 2]
    (cap.maps[0].sum() + cap.maps[2].sum()).backward()
    q_proj = model.model.language_model.layers[0].self_attn.q_proj.weight
    assert q_proj.grad is not None and q_proj.grad.abs().sum() > 0


def test_capture_rejects_bad_layers_and_missing_enable(tiny_models):
    model = load_model(tiny_models["internvl", "student"])
    with pytest.raises(ValueError, match="enable_capture"):
        AttentionCapture(model, [0])
    enable_capture(model)
    with pytest.raises(ValueError, match=r"out of range: the model has 4 decoder layers"):
        AttentionCapture(model, [0, 7])
