"""Real-size model configs (published layer, head and hidden sizes) for benchmarks and memory estimates."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, InternVLConfig, Qwen2_5_VLConfig

from pipeline.models.load import KNOWN_MODELS

# Published language-model shapes: (layers, hidden, heads, kv_heads, intermediate, vocab).
_LM_SHAPES = {
    "InternVL3-1B": (24, 896, 14, 2, 4864, 151674),
    "InternVL3-2B": (28, 1536, 12, 2, 8960, 151674),
    "InternVL3-8B": (28, 3584, 28, 4, 18944, 151674),
    "InternVL3-14B": (48, 5120, 40, 8, 13824, 151674),
    "InternVL3-38B": (64, 5120, 40, 8, 27648, 151674),
    "InternVL3-78B": (80, 8192, 64, 8, 29568, 151674),
    "Qwen2.5-VL-3B-Instruct": (36, 2048, 16, 2, 11008, 151936),
    "Qwen2.5-VL-7B-Instruct": (28, 3584, 28, 4, 18944, 151936),
    "Qwen2.5-VL-32B-Instruct": (64, 5120, 40, 8, 27648, 152064),
    "Qwen2.5-VL-72B-Instruct": (80, 8192, 64, 8, 29568, 152064),
}
# InternViT-300M (1B-14B) and InternViT-6B (38B, 78B): (layers, hidden, heads, intermediate, qk_norm, norm).
_INTERNVIT = {"300M": (24, 1024, 16, 4096, False, "layer_norm"), "6B": (45, 3200, 25, 12800, True, "rms_norm")}
_INTERNVIT_6B = {"InternVL3-38B", "InternVL3-78B"}


def real_config(name: str):
    """Config of a real-size model (published layer/head/hidden sizes) for random-initialised benchmarks."""
    if name not in _LM_SHAPES:
        raise ValueError(f"no real-size config for {name!r}; available: {', '.join(_LM_SHAPES)}")
    layers, hidden, heads, kv, inter, vocab = _LM_SHAPES[name]
    text = dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv,
                intermediate_size=inter, vocab_size=vocab, max_position_embeddings=32768, rope_theta=1e6)
    if KNOWN_MODELS[name][0] == "internvl":
        v_layers, v_hidden, v_heads, v_inter, qk_norm, norm = _INTERNVIT["6B" if name in _INTERNVIT_6B else "300M"]
        vision = dict(num_hidden_layers=v_layers, hidden_size=v_hidden, num_attention_heads=v_heads,
                      intermediate_size=v_inter, use_qk_norm=qk_norm, norm_type=norm, image_size=448, patch_size=14)
        return InternVLConfig(vision_config=vision, text_config={"model_type": "qwen2", **text},
                              image_token_id=151667, image_seq_length=256, downsample_ratio=0.5,
                              tie_word_embeddings=name == "InternVL3-1B")
    vision = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=hidden,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[7, 15, 23, 31])
    text["rope_parameters"] = {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6}
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                            vision_start_token_id=151652, vision_end_token_id=151653)


def shape_config(name_or_dir: str):
    """The config of a model directory, or the ``real_config`` of a real-size name (benchmarks, estimates)."""
    return AutoConfig.from_pretrained(name_or_dir) if Path(name_or_dir).is_dir() else real_config(name_or_dir)
