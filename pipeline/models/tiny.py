"""Tiny random-initialised models of the real architectures (tests, ``make demo``).

Native InternVL / Qwen2.5-VL classes with a tokenizer trained locally on a corpus the caller passes in
(``corpus``: the demo data's vocabulary for ``make demo``), saved with ``save_pretrained`` so that
the same loading code opens them as it opens a real checkpoint.

What they share with the real checkpoints (InternVL3-*-hf, Qwen2.5-VL-*-Instruct; the values are in
tests/fixtures/hf_checkpoint_configs.json with their sources): the chat templates, Qwen's default system
turn included; the special tokens and how each tokenizer exposes them (InternVL's named ``<img>``,
``</img>``, ``<IMG_CONTEXT>``, ``<video>``; Qwen's unnamed list in its id order); ``image_token_id``
and the vision start/end ids of the config pointing at those tokens; the image-processor classes and
fields (InternVL: GotOcr2 with ``crop_to_patches=False``, ``min_patches=1``, ``max_patches=12``, the processor
call defaulting to crop_to_patches=True as the real one; Qwen: Qwen2-VL with patch, merge and temporal
patch sizes and a pixel range); the PIL backend. What is tiny: the sizes (112 px tiles, patch 8, 49 vision
tokens per image instead of 448 px, patch 14, 256), Qwen's pixel range fixed to one 112 px tile, the vocabulary,
and InternVL's normalisation constants (CLIP's, as in the committed demo teacher, where InternVL3-hf uses
ImageNet's): changing them would change the demo teacher's inputs and the stored regression figures.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, InternVLConfig, Qwen2_5_VLConfig

from pipeline.models.processors import (
    FAMILIES,
    INTERNVL_CHAT_TEMPLATE,
    PROCESSOR_CLASSES,
    QWEN_CHAT_TEMPLATE,
    build_tokenizer,
)

TINY_IMAGE_SIZE = 112  # one tile; patch 8 -> 14x14 patches -> 49 vision tokens after the 2x2 merge
# Vision tower of both roles: 2 layers, 64 wide (one 32-wide layer could not learn the demo scenes).
TINY_VISION = {"layers": 2, "hidden": 64, "heads": 4, "intermediate": 128}
TINY_LM = {  # role -> (layers, hidden, heads, kv_heads, intermediate); head_dim 16 in both
    "teacher": (6, 128, 8, 2, 256),
    "student": (4, 64, 4, 2, 128),
}


def _tiny_internvl(tokenizer, role: str):
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    layers, hidden, heads, kv, inter = TINY_LM[role]
    vision = dict(num_hidden_layers=TINY_VISION["layers"], hidden_size=TINY_VISION["hidden"],
                  num_attention_heads=TINY_VISION["heads"], intermediate_size=TINY_VISION["intermediate"],
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
    vision = dict(depth=TINY_VISION["layers"], hidden_size=TINY_VISION["hidden"], num_heads=TINY_VISION["heads"],
                  intermediate_size=TINY_VISION["intermediate"], out_hidden_size=hidden, patch_size=8,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=32,
                  fullatt_block_indexes=list(range(TINY_VISION["layers"])))
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


def build_tiny(family: str, role: str, out_dir: str | Path, *, corpus: list[str], seed: int = 0) -> Path:
    """Write a random-initialised tiny model of the real architecture, its tokenizer and processor.

    Teacher and student of one family share the tokenizer (trained on the same corpus) and the
    vision-token count; the teacher has more layers and heads.
    """
    if family not in FAMILIES:
        raise ValueError(f"family {family!r} is not one of {FAMILIES}")
    if role not in TINY_LM:
        raise ValueError(f"role {role!r} is not one of {sorted(TINY_LM)}")
    tokenizer = build_tokenizer(corpus, family)
    config, processor = (_tiny_internvl if family == "internvl" else _tiny_qwen)(tokenizer, role)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
