"""Capture at chosen layers equals the head mean of eager output_attentions=True."""

import pytest
import torch
from conftest import make_sample

from pipeline.attention.capture import AttentionCapture, enable_capture
from pipeline.attention.layout import build_layout, collate_inputs
from pipeline.models.load import load_model
from pipeline.models.processors import load_processor

FAMILIES = ("internvl", "qwen2_5_vl")


def _batch(model_dir, view_counts):
    processor = load_processor(model_dir)
    layouts = [build_layout(*make_sample(n, key=f"k{i}", question="Question " * (i + 1)), processor)
               for i, n in enumerate(view_counts)]
    return collate_inputs([lay.model_inputs for lay in layouts], processor.tokenizer.pad_token_id)


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


def _plain_attention(query, key, value, mask, scaling):
    scores = (query @ key.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    return probs.to(value.dtype) @ value, probs.mean(dim=1)


@pytest.mark.parametrize("padded", [False, True])
def test_recomputed_backward_equals_autograd(padded):
    from pipeline.attention.capture import captured_attention

    g = torch.Generator().manual_seed(0)
    b, h, s, d = 2, 3, 7, 4
    query, key, value = (torch.randn(b, h, s, d, generator=g, dtype=torch.float64, requires_grad=True)
                         for _ in range(3))
    mask = torch.ones(s, s, dtype=torch.bool).tril()[None, None].repeat(b, 1, 1, 1)
    if padded:
        mask[0, :, :, :2] = False  # left padding of the first sample
    w_out, w_mean = torch.randn(b, h, s, d, generator=g, dtype=torch.float64), torch.randn(b, s, s, generator=g,
                                                                                         dtype=torch.float64)
    grads = []
    for fn in (captured_attention, _plain_attention):
        out, mean = fn(query, key, value, mask, 0.5)
        (out * w_out).sum().add((mean * w_mean).sum()).backward()
        grads.append([t.grad.clone() for t in (query, key, value)])
        for t in (query, key, value):
            t.grad = None
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)  # float32 inside vs a float64 oracle
    out, mean = captured_attention(query, key, value, None, 0.5)  # no mask given: causal
    (mean.sum() * 0 + mean[:, -1].square().sum()).backward()
    assert query.grad is not None and value.grad.abs().sum() == 0  # the map alone does not involve V


def test_recompute_option_gives_the_same_gradients(tiny_models):
    model_dir = tiny_models["qwen2_5_vl", "student"]
    inputs = _batch(model_dir, [6])
    grads = []
    for recompute in (False, True):
        model = load_model(model_dir)
        enable_capture(model)
        with AttentionCapture(model, [0, 1, 2], recompute=recompute) as cap:
            out = model(**inputs)
        loss = out.logits.float().square().mean() + sum(m.square().sum() for m in cap.maps.values())
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
