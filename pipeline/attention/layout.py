"""The one layout builder (DESIGN contract 1).

Teacher caching and student training both call ``build_layout`` on the same record with the
model's own processor, so the token sequence (chat markup, expanded image tokens, answer) is built
by one piece of code. Each layout carries a digest over the text token ids, the vision spans, the
sequence length, the answer span and the tiling policy; the trainer compares it with the cached one.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

import torch
from PIL import Image

from schemas.qa import QARecord

LAYOUT_VERSION = 1
IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class TilingPolicy:
    """How an image becomes vision tokens.

    tile_size: side of the square tile in pixels (448 for the real models: 256 vision tokens).
    max_tiles: 1 = the whole image resized to one tile (METHOD section 2); >1 = InternVL dynamic tiling.
    """

    tile_size: int
    max_tiles: int = 1

    def __post_init__(self):
        if self.tile_size <= 0 or self.max_tiles < 1:
            raise ValueError(f"invalid tiling policy {self}: tile_size must be > 0 and max_tiles >= 1")

    def describe(self) -> dict:
        return {"tile_size": self.tile_size, "max_tiles": self.max_tiles}


@dataclass
class Layout:
    """One sample laid out for one model.

    input_ids: [S] long; labels: [S] long (answer tokens, -100 elsewhere); is_vision: [S] bool.
    model_inputs: the processor's batch-of-one tensors (input_ids, attention_mask, pixel_values, ...).
    """

    key: str
    input_ids: torch.Tensor
    labels: torch.Tensor
    is_vision: torch.Tensor
    vision_spans: list[tuple[int, int]]
    answer_span: tuple[int, int]
    tiling: TilingPolicy
    model_inputs: dict = field(repr=False)
    digest: str = ""

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.numel())

    @property
    def n_vision(self) -> int:
        return int(self.is_vision.sum())

    @property
    def n_text(self) -> int:
        return self.seq_len - self.n_vision

    def summary(self) -> dict:
        """JSON-friendly description stored with cached maps."""
        return {"seq_len": self.seq_len, "n_text": self.n_text, "n_vision": self.n_vision,
                "vision_spans": [list(s) for s in self.vision_spans], "answer_span": list(self.answer_span),
                "tiling": self.tiling.describe(), "digest": self.digest, "layout_version": LAYOUT_VERSION}


def _family(processor) -> str:
    return "qwen2_5_vl" if hasattr(processor.image_processor, "merge_size") else "internvl"


def default_tiling(processor) -> TilingPolicy:
    """One tile at the processor's native tile size (448 px for the real checkpoints)."""
    ip = processor.image_processor
    if _family(processor) == "internvl":
        return TilingPolicy(tile_size=int(ip.size["height"]))
    unit = ip.patch_size * ip.merge_size
    max_pixels = ip.size["longest_edge"]  # Qwen2-VL processors keep the pixel budget here
    side = 448 if max_pixels >= 448 * 448 else math.isqrt(max_pixels) // unit * unit
    return TilingPolicy(tile_size=side)


def vision_token_id(processor) -> int:
    return int(processor.image_token_id)


def _messages(record: QARecord) -> list[dict]:
    parts = record.question.split(IMAGE_PLACEHOLDER)
    content: list[dict] = []
    for i, text in enumerate(parts):
        if i > 0:
            content.append({"type": "image"})
        if text:
            content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": record.answer}]}]


def _processor_kwargs(processor, tiling: TilingPolicy) -> dict:
    """The one-tile policy as explicit processor arguments (the real checkpoints' defaults differ)."""
    if _family(processor) == "internvl":
        return {"crop_to_patches": tiling.max_tiles > 1, "max_patches": tiling.max_tiles}
    if tiling.max_tiles != 1:
        raise ValueError(f"tiling max_tiles={tiling.max_tiles}: Qwen2.5-VL has no tiling; use max_tiles=1")
    pixels = tiling.tile_size * tiling.tile_size  # fixes the real checkpoints' 3136..12845056 pixel range
    return {"size": {"shortest_edge": pixels, "longest_edge": pixels}}


def _spans(mask: torch.Tensor) -> list[tuple[int, int]]:
    padded = torch.cat([torch.zeros(1, dtype=torch.int8), mask.to(torch.int8), torch.zeros(1, dtype=torch.int8)])
    edges = torch.nonzero(padded[1:] - padded[:-1]).flatten().tolist()
    return [(edges[i], edges[i + 1]) for i in range(0, len(edges), 2)]


def layout_digest(input_ids: torch.Tensor, is_vision: torch.Tensor, answer_span, tiling: TilingPolicy) -> str:
    """sha256 over text token ids, vision spans, length, answer span and tiling (first 16 hex digits)."""
    payload = {"v": LAYOUT_VERSION, "S": int(input_ids.numel()), "text_ids": input_ids[~is_vision].tolist(),
               "vision_spans": _spans(is_vision), "answer_span": list(answer_span), "tiling": tiling.describe()}
    return hashlib.sha256(json.dumps(payload, separators=(",", ":")).encode()).hexdigest()[:16]


def build_layout(record: QARecord, images: list[Image.Image], processor, *,
                 tiling: TilingPolicy | None = None) -> Layout:
    """Lay out one QA record for the model behind ``processor``.

    The user turn holds the images (each expanded to its vision tokens where its placeholder
    stands) and the question; the assistant turn holds the answer. Labels cover the answer and the
    end-of-turn token; everything else is -100.
    """
    if len(images) != len(record.images):
        raise ValueError(f"sample {record.key}: record lists {len(record.images)} images, got {len(images)}")
    tiling = tiling or default_tiling(processor)
    images = _tile_images(images, tiling)
    messages = _messages(record)
    full_text = processor.apply_chat_template(messages, tokenize=False)
    prompt_text = processor.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    if not full_text.startswith(prompt_text) or not full_text[len(prompt_text):].startswith(record.answer):
        raise ValueError(f"sample {record.key}: the chat template does not render the prompt as a prefix of the "
                         "conversation followed by the answer; this template is not supported by the layout builder")
    inputs = processor(text=[full_text], images=images or None, return_tensors="pt",
                       **_processor_kwargs(processor, tiling))
    input_ids = inputs["input_ids"][0]
    tokenizer = processor.tokenizer
    suffix_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    end = len(suffix_ids)
    if tokenizer.eos_token_id in suffix_ids:
        end = suffix_ids.index(tokenizer.eos_token_id) + 1
    start = input_ids.numel() - len(suffix_ids)
    if input_ids[start:].tolist() != suffix_ids:
        raise ValueError(f"sample {record.key}: the answer does not tokenise the same inside the conversation as "
                         "alone (a token merges across the prompt/answer boundary); cannot place labels exactly")
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[start:start + end] = input_ids[start:start + end]
    is_vision = input_ids == vision_token_id(processor)
    answer_span = (start, start + end)
    return Layout(key=record.key, input_ids=input_ids, labels=labels, is_vision=is_vision,
                  vision_spans=_spans(is_vision), answer_span=answer_span, tiling=tiling, model_inputs=dict(inputs),
                  digest=layout_digest(input_ids, is_vision, answer_span, tiling))


def _tile_images(images: list[Image.Image], tiling: TilingPolicy) -> list[Image.Image]:
    if tiling.max_tiles == 1:
        return [im.convert("RGB").resize((tiling.tile_size, tiling.tile_size), Image.BICUBIC) for im in images]
    return [im.convert("RGB") for im in images]


def build_prompt(record: QARecord, images: list[Image.Image], processor, *,
                 tiling: TilingPolicy | None = None, system: str | None = None) -> dict:
    """Model inputs for generation: the same user turn as ``build_layout``, then the assistant header.

    ``system``: text of a system turn put first (evaluation with a benchmark's own system prompt).
    Returns the processor's batch-of-one tensors; the answer is not included.
    """
    if len(images) != len(record.images):
        raise ValueError(f"sample {record.key}: record lists {len(record.images)} images, got {len(images)}")
    tiling = tiling or default_tiling(processor)
    messages = _messages(record)[:1]
    if system is not None:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    prompt_text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return dict(processor(text=[prompt_text], images=_tile_images(images, tiling) or None, return_tensors="pt",
                          **_processor_kwargs(processor, tiling)))


SEQUENCE_INPUTS = {"input_ids": None, "attention_mask": 0, "mm_token_type_ids": 0}  # name -> pad value (None: pad id)


def collate_inputs(inputs: list[dict], pad_token_id: int) -> dict:
    """Left-padded batch of processor outputs (as generation and batched capture expect)."""
    s_max = max(item["input_ids"].shape[-1] for item in inputs)
    batch = {}
    for name in inputs[0]:
        if name in SEQUENCE_INPUTS:
            fill = pad_token_id if SEQUENCE_INPUTS[name] is None else SEQUENCE_INPUTS[name]
            batch[name] = torch.cat([torch.nn.functional.pad(item[name], (s_max - item[name].shape[-1], 0), value=fill)
                                     for item in inputs])
        else:
            batch[name] = torch.cat([item[name] for item in inputs])
    return batch
