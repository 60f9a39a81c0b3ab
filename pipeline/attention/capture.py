"""Attention capture at chosen decoder layers only (DESIGN contract 2).

One attention function is registered with transformers' ``AttentionInterface`` (and the matching
``AttentionMaskInterface`` entry, so the causal/padding mask reaches it). At a captured decoder
layer it forms ``softmax(Q K^T * scale + mask)`` in float32, averages the heads on the device and
hands the map to the active ``AttentionCapture``; every other layer (and the vision tower) runs
SDPA. Nothing is added to ``outputs.attentions``. Gradients flow through the captured maps, so the
student trainer uses the same function (optionally recomputing the probabilities in backward to
save memory).

    enable_capture(model)
    with AttentionCapture(model, layers=[0, 22]) as cap:
        model(**inputs)
    cap.maps[0]  # [B, S, S] float32 head mean
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

CAPTURE_IMPLEMENTATION = "drivekd_capture"

# id(attention module) -> (capture, layer index); filled only while a capture context is open.
_ACTIVE: dict[int, tuple[AttentionCapture, int]] = {}


def _probabilities(query, key, attention_mask, scaling) -> torch.Tensor:
    """softmax(Q K^T * scaling + mask) in float32. query, key [B,H,S,D] -> [B,H,S,S]."""
    with torch.autocast(query.device.type, enabled=False):  # float32 under bf16 autocast too (student)
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask.float()
        return torch.softmax(scores, dim=-1)


class _RecomputedAttention(torch.autograd.Function):
    """Attention output and head-mean probabilities; backward recomputes the probabilities.

    Only Q, K, V (and the shared mask) are kept for backward instead of the [B,H,S,S] float32
    probabilities, so a captured student layer costs about the activation memory of an SDPA layer.
    forward(query, key, value [B,H,S,D], mask [B|1,1,S,S], scaling) -> (output [B,H,S,D], head_mean [B,S,S]).
    """

    @staticmethod
    def forward(ctx, query, key, value, attention_mask, scaling):
        probs = _probabilities(query, key, attention_mask, scaling)
        ctx.save_for_backward(query, key, value, attention_mask)
        ctx.scaling = scaling
        with torch.autocast(query.device.type, enabled=False):
            output = torch.matmul(probs.to(value.dtype), value)
        return output, probs.mean(dim=1)

    @staticmethod
    def backward(ctx, grad_output, grad_mean):
        query, key, value, attention_mask = ctx.saved_tensors
        probs = _probabilities(query, key, attention_mask, ctx.scaling)
        grad_value, grad_probs = None, torch.zeros_like(probs)
        with torch.autocast(query.device.type, enabled=False):
            if grad_output is not None:
                grad_value = torch.matmul(probs.to(value.dtype).transpose(-1, -2), grad_output)
                grad_probs = torch.matmul(grad_output, value.transpose(-1, -2)).float()
            if grad_mean is not None:
                grad_probs = grad_probs + grad_mean.float()[:, None] / probs.shape[1]
            grad_scores = probs * (grad_probs - (grad_probs * probs).sum(dim=-1, keepdim=True)) * ctx.scaling
            if attention_mask.dtype == torch.bool:  # masked_fill passes no gradient to masked scores
                grad_scores = grad_scores.masked_fill(~attention_mask, 0.0)
            grad_query = torch.matmul(grad_scores, key.float()).to(query.dtype)
            grad_key = torch.matmul(grad_scores.transpose(-1, -2), query.float()).to(key.dtype)
        return grad_query, grad_key, grad_value, None, None


def _causal_if_none(attention_mask, query, key):
    if attention_mask is not None:
        return attention_mask
    q_len, k_len = query.shape[-2], key.shape[-2]
    return torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)[None, None]


def captured_attention(query, key, value, attention_mask, scaling):
    """(output [B,H,S,D], head-mean probabilities [B,S,S]); backward recomputes the probabilities."""
    return _RecomputedAttention.apply(query, key, value, _causal_if_none(attention_mask, query, key), scaling)


def capture_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                              scaling: float | None = None, **kwargs):
    """The registered attention function: probabilities at captured layers, SDPA elsewhere."""
    entry = _ACTIVE.get(id(module))
    if entry is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    capture, layer = entry
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    groups = getattr(module, "num_key_value_groups", 1)
    if module.training and dropout > 0:
        raise ValueError(f"attention dropout {dropout} is not supported at captured layers; set attention_dropout=0")
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if capture.recompute:
        output, head_mean = captured_attention(query, key, value, attention_mask, scaling)
    else:
        probs = _probabilities(query, key, _causal_if_none(attention_mask, query, key), scaling)
        output, head_mean = torch.matmul(probs.to(value.dtype), value), probs.mean(dim=1)
    capture.record(layer, head_mean)
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(CAPTURE_IMPLEMENTATION, capture_attention_forward)
AttentionMaskInterface.register(CAPTURE_IMPLEMENTATION, sdpa_mask)


def decoder_attention_modules(model) -> list[torch.nn.Module]:
    """The self-attention module of every language-model decoder layer, in order."""
    inner = getattr(model, "model", model)
    language_model = getattr(inner, "language_model", None)
    if language_model is None or not hasattr(language_model, "layers"):
        raise ValueError(f"{type(model).__name__}: cannot find the language model's decoder layers "
                         "(expected model.model.language_model.layers)")
    return [layer.self_attn for layer in language_model.layers]


def enable_capture(model) -> None:
    """Route the language model's attention through the capture function (vision tower unchanged)."""
    model.set_attn_implementation({"text_config": CAPTURE_IMPLEMENTATION})


class AttentionCapture:
    """Context manager collecting head-mean attention maps at ``layers`` (decoder indices).

    ``maps[layer]`` is [B, S, S] float32 (rows = queries), attached to the autograd graph when the
    forward runs with gradients. ``transform(layer, map) -> tensor`` may slice a map as it arrives
    (e.g. to a text-to-vision block) so the full map is not kept. ``recompute=True`` keeps only Q, K,
    V for backward and recomputes the [B,H,S,S] probabilities there: far less activation memory per
    captured layer, one more attention forward per backward.
    """

    def __init__(self, model, layers, *, transform=None, recompute: bool = False):
        self.modules = decoder_attention_modules(model)
        n = len(self.modules)
        resolved = sorted({layer + n if layer < 0 else layer for layer in layers})
        bad = [layer for layer in resolved if not 0 <= layer < n]
        if bad:
            raise ValueError(f"capture layers {bad} out of range: the model has {n} decoder layers (0..{n - 1})")
        if model.config.get_text_config()._attn_implementation != CAPTURE_IMPLEMENTATION:
            raise ValueError("the model's language model does not use the capture attention; call "
                             "pipeline.capture.enable_capture(model) after loading it")
        self.layers = resolved
        self.transform = transform
        self.recompute = recompute
        self.maps: dict[int, torch.Tensor] = {}

    def record(self, layer: int, head_mean: torch.Tensor) -> None:
        self.maps[layer] = self.transform(layer, head_mean) if self.transform else head_mean

    def __enter__(self) -> AttentionCapture:
        self.maps = {}
        for layer in self.layers:
            _ACTIVE[id(self.modules[layer])] = (self, layer)
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.layers:
            _ACTIVE.pop(id(self.modules[layer]), None)
