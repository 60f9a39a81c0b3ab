"""Model resolution, loading, real-size configs and the tiny-model factory.

``resolve_model`` maps a directory or a known checkpoint name to a local ``save_pretrained``
directory; ``load_model`` opens it with native transformers classes (no remote code unless asked).
``python -m pipeline.models tiny ...`` writes random-initialised tiny models of the real
architectures with a locally built tokenizer, so the same loading code runs offline in tests and
in ``make demo``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, InternVLConfig, Qwen2_5_VLConfig

from pipeline.processors import (
    FAMILIES,
    INTERNVL_CHAT_TEMPLATE,
    PROCESSOR_CLASSES,
    QWEN_CHAT_TEMPLATE,
    build_tokenizer,
    family_of,
)

# name -> (family, official Hugging Face repository id)
KNOWN_MODELS = {
    "InternVL3-1B": ("internvl", "OpenGVLab/InternVL3-1B-hf"),
    "InternVL3-2B": ("internvl", "OpenGVLab/InternVL3-2B-hf"),
    "InternVL3-8B": ("internvl", "OpenGVLab/InternVL3-8B-hf"),
    "InternVL3-14B": ("internvl", "OpenGVLab/InternVL3-14B-hf"),
    "InternVL3-38B": ("internvl", "OpenGVLab/InternVL3-38B-hf"),
    "InternVL3-78B": ("internvl", "OpenGVLab/InternVL3-78B-hf"),
    "Qwen2.5-VL-3B-Instruct": ("qwen2_5_vl", "Qwen/Qwen2.5-VL-3B-Instruct"),
    "Qwen2.5-VL-7B-Instruct": ("qwen2_5_vl", "Qwen/Qwen2.5-VL-7B-Instruct"),
    "Qwen2.5-VL-32B-Instruct": ("qwen2_5_vl", "Qwen/Qwen2.5-VL-32B-Instruct"),
    "Qwen2.5-VL-72B-Instruct": ("qwen2_5_vl", "Qwen/Qwen2.5-VL-72B-Instruct"),
}

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def model_dir_root() -> Path:
    """``$MODEL_DIR`` (default ``models/``), where known names are looked up."""
    return Path(os.environ.get("MODEL_DIR", "models"))


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A local ``save_pretrained`` directory for a path or a known name (``InternVL3-38B``, ...).

    Raises FileNotFoundError naming the directory expected and how to obtain the checkpoint.
    """
    text = str(name_or_path)
    path = Path(text)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face save_pretrained directory.")
        return path
    short = text.split("/")[-1].removesuffix("-hf")
    known = {k.lower(): k for k in KNOWN_MODELS} | {k.lower().removesuffix("-instruct"): k for k in KNOWN_MODELS}
    if short.lower() not in known:
        raise FileNotFoundError(
            f"model {text!r}: no such directory, and not a known name. Known names: {', '.join(KNOWN_MODELS)}. "
            "Pass a directory written by save_pretrained, or set MODEL_DIR to the folder holding <name>/.")
    name = known[short.lower()]
    expected = model_dir_root() / name
    if (expected / "config.json").is_file():
        return expected
    repo = KNOWN_MODELS[name][1]
    raise FileNotFoundError(
        f"model {name}: expected a Hugging Face checkpoint at {expected}/ (config.json missing). Obtain it with "
        f"`huggingface-cli download {repo} --local-dir {expected}`"
        + (" (the '-hf' repository is the native-transformers format; the original InternVL3 repo needs "
           "remote code)" if KNOWN_MODELS[name][0] == "internvl" else "")
        + ", or set MODEL_DIR to the folder that holds it.")


def load_model(model_dir: str | Path, *, dtype: str = "fp32", device_map=None, attn_implementation: str = "sdpa",
               trust_remote_code: bool = False):
    """Open a checkpoint with ``AutoModelForImageTextToText`` (native classes by default)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    family_of(model_dir)  # clear error for unsupported/foreign directories
    return AutoModelForImageTextToText.from_pretrained(
        str(model_dir), dtype=DTYPES[dtype], device_map=device_map, attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code)


def decoder_layers(model) -> int:
    """Number of decoder (language-model) layers."""
    return model.config.get_text_config().num_hidden_layers


# ---------------------------------------------------------------- real-size configs (benchmarks)
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


# ---------------------------------------------------------------- tiny models (tests, demo)
TINY_IMAGE_SIZE = 112  # one tile; patch 8 -> 14x14 patches -> 49 vision tokens after the 2x2 merge
TINY_LM = {  # role -> (layers, hidden, heads, kv_heads, intermediate); head_dim 16 in both
    "teacher": (6, 128, 8, 2, 256),
    "student": (4, 64, 4, 2, 128),
}


def _tiny_internvl(tokenizer, role: str):
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    layers, hidden, heads, kv, inter = TINY_LM[role]
    vision = dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                  image_size=TINY_IMAGE_SIZE, patch_size=8)
    text = dict(model_type="qwen2", num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                num_key_value_heads=kv, intermediate_size=inter, vocab_size=len(tokenizer),
                max_position_embeddings=4096, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    seq = (TINY_IMAGE_SIZE // 8) ** 2 // 4
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.context_image_token_id,
                            image_seq_length=seq, downsample_ratio=0.5, tie_word_embeddings=True)
    image_processor = GotOcr2ImageProcessorPil(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
                                               crop_to_patches=False)
    processor = PROCESSOR_CLASSES["internvl"](image_processor=image_processor, tokenizer=tokenizer,
                                              image_seq_length=seq, chat_template=INTERNVL_CHAT_TEMPLATE)
    return config, processor


def _tiny_qwen(tokenizer, role: str):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    layers, hidden, heads, kv, inter = TINY_LM[role]
    vision = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=hidden,
                  patch_size=8, spatial_merge_size=2, temporal_patch_size=2, window_size=32,
                  fullatt_block_indexes=[0])
    text = dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv,
                intermediate_size=inter, vocab_size=len(tokenizer), max_position_embeddings=4096, bos_token_id=None,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in
           [("image", "<|image_pad|>"), ("video", "<|video_pad|>"), ("start", "<|vision_start|>"),
            ("end", "<|vision_end|>")]}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["image"],
                              video_token_id=ids["video"], vision_start_token_id=ids["start"],
                              vision_end_token_id=ids["end"], tie_word_embeddings=True)
    pixels = TINY_IMAGE_SIZE * TINY_IMAGE_SIZE
    image_processor = Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2,
                                               min_pixels=pixels, max_pixels=pixels)
    processor = PROCESSOR_CLASSES["qwen2_5_vl"](image_processor=image_processor, tokenizer=tokenizer,
                                                chat_template=QWEN_CHAT_TEMPLATE)
    return config, processor


def build_tiny(family: str, role: str, out_dir: str | Path, *, seed: int = 0, corpus: list[str] | None = None) -> Path:
    """Write a random-initialised tiny model of the real architecture, its tokenizer and processor.

    Teacher and student of one family share the tokenizer (trained on the same corpus) and the
    vision-token count; the teacher has more layers and heads.
    """
    if family not in FAMILIES:
        raise ValueError(f"family {family!r} is not one of {FAMILIES}")
    if role not in TINY_LM:
        raise ValueError(f"role {role!r} is not one of {sorted(TINY_LM)}")
    if corpus is None:
        from pipeline.demo_data import vocabulary_corpus

        corpus = vocabulary_corpus()
    tokenizer = build_tokenizer(corpus, family)
    config, processor = (_tiny_internvl if family == "internvl" else _tiny_qwen)(tokenizer, role)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.models",
        description="Model utilities. `tiny` writes a random-initialised tiny InternVL or Qwen2.5-VL model "
                    "(native transformers classes) with a locally trained tokenizer and its processor, "
                    "loadable offline with AutoModelForImageTextToText and pipeline.processors.load_processor.",
        epilog="example: python -m pipeline.models tiny --family internvl --role teacher --out models/demo-teacher")
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("tiny", help="write a tiny random-initialised model directory")
    tiny.add_argument("--family", choices=FAMILIES, required=True)
    tiny.add_argument("--role", choices=sorted(TINY_LM), required=True,
                      help="teacher: 6 layers, 8 heads; student: 4 layers, 4 heads (same tokenizer and vision tokens)")
    tiny.add_argument("--out", required=True, help="output directory (save_pretrained layout)")
    tiny.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    args = parser.parse_args(argv)
    out = build_tiny(args.family, args.role, args.out, seed=args.seed)
    print(f"wrote tiny {args.family} {args.role} to {out}")


if __name__ == "__main__":
    main()
