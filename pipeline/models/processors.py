"""Image-only processors for the two model families, and the tiny local tokenizer.

The native InternVL / Qwen2.5-VL processors also own a video processor, which needs torchvision.
Driving QA is image-only, so these subclasses drop the video processor and keep everything else
(tokenizer, image processor, chat template, image-token expansion) native. They load the same
``save_pretrained`` directories as the native classes, real checkpoints included.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import InternVLProcessor, PreTrainedTokenizerFast, Qwen2_5_VLProcessor

FAMILIES = ("internvl", "qwen2_5_vl")
MODEL_TYPE_TO_FAMILY = {"internvl": "internvl", "qwen2_5_vl": "qwen2_5_vl"}

# Chat templates of the two families' Hugging Face checkpoints, as they ship them (config values; the test
# fixture tests/fixtures/hf_checkpoint_configs.json names the public sources they were checked against):
# InternVL3-*-hf (ChatML, one <IMG_CONTEXT> placeholder per image, expanded by the processor to
# <img><IMG_CONTEXT>*256</img>; no system turn) and Qwen2.5-VL-*-Instruct (ChatML with the default system turn
# QWEN_DEFAULT_SYSTEM when the conversation does not start with one).
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)
QWEN_DEFAULT_SYSTEM = "You are a helpful assistant."
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + QWEN_DEFAULT_SYSTEM + "<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

IMAGE_BACKEND = "pil"
"""Image-processor backend, pinned so that the cache machine and the training machine normalise pixels
identically (transformers picks torchvision where it is installed otherwise)."""

CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
FAMILY_SPECIALS = {  # family -> {the processor's name for a token: the token}
    "internvl": {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    },
    "qwen2_5_vl": {
        "vision_start_token": "<|vision_start|>",
        "vision_end_token": "<|vision_end|>",
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
    },
}


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
"""The special tokens of the Qwen2.5-VL tokenizer, in its id order (151643..151656)."""

INTERNVL_MAX_LENGTH = 8192
"""model_max_length of the InternVL3-hf tokenizers (the conversion script's context length)."""


class InternVLImageProcessor(InternVLProcessor):
    """InternVLProcessor without the video processor (no torchvision needed)."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, image_seq_length=image_seq_length,
                         chat_template=chat_template, **kwargs)


class Qwen2_5_VLImageProcessor(Qwen2_5_VLProcessor):
    """Qwen2_5_VLProcessor without the video processor (no torchvision needed)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


PROCESSOR_CLASSES = {"internvl": InternVLImageProcessor, "qwen2_5_vl": Qwen2_5_VLImageProcessor}


def family_of(model_dir: str | Path) -> str:
    """Family name ("internvl" / "qwen2_5_vl") read from ``config.json``'s ``model_type``."""
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: {model_dir} is not a Hugging Face model directory "
                                "(expected config.json written by save_pretrained).")
    config = json.loads(config_path.read_text())
    model_type = config.get("model_type")
    if model_type == "internvl_chat" or (model_type not in MODEL_TYPE_TO_FAMILY and "auto_map" in config):
        name = Path(model_dir).name
        raise ValueError(f"{config_path}: model_type {model_type!r} with auto_map is a remote-code checkpoint (the "
                         f"original OpenGVLab release); this project loads native transformers classes only. Fix: "
                         f"download the Hugging Face format instead, e.g. OpenGVLab/{name.removesuffix('-hf')}-hf.")
    if model_type not in MODEL_TYPE_TO_FAMILY:
        raise ValueError(f"{config_path}: model_type {model_type!r} is not supported; supported: "
                         f"{sorted(MODEL_TYPE_TO_FAMILY)} (use the Hugging Face '-hf' format for InternVL3).")
    return MODEL_TYPE_TO_FAMILY[model_type]


def load_processor(model_dir: str | Path):
    """The family's image-only processor loaded from a ``save_pretrained`` directory, PIL image backend."""
    processor = PROCESSOR_CLASSES[family_of(model_dir)].from_pretrained(str(model_dir), backend=IMAGE_BACKEND)
    backend = image_backend(processor)
    if backend != IMAGE_BACKEND:
        raise ValueError(f"{model_dir}: the image processor loaded with the {backend} backend "
                         f"({type(processor.image_processor).__name__}), not {IMAGE_BACKEND}. Fix: install Pillow "
                         "(`pip install pillow`) so that pixels are normalised the same on every machine.")
    return processor


def image_backend(processor) -> str:
    """"pil" or "torchvision": the backend of a processor's image processor (recorded with caches)."""
    return "pil" if type(processor.image_processor).__name__.endswith("Pil") else "torchvision"


def build_tokenizer(corpus: list[str], family: str, *, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained locally on ``corpus`` with the family's special tokens.

    Byte-level, so any text (object references such as ``<c1,CAM_FRONT,0.46,0.67>`` included)
    round-trips exactly; the chat and image tokens are atomic special tokens. As in the real tokenizers:
    InternVL3-hf names its image tokens (``start_image_token``, ``end_image_token``,
    ``context_image_token``, ``video_token``: its processor reads them by these names) and has
    model_max_length 8192; Qwen2.5-VL lists its special tokens without names (its processor falls back to
    ``<|image_pad|>`` / ``<|video_pad|>``). The InternVL tokenizer is the one of the committed demo teacher
    (benchmarks/demo-teacher): its token ids must not change.
    """
    if family == "internvl":
        named = FAMILY_SPECIALS[family]
        specials, extra, limit = CHAT_SPECIALS + list(named.values()), named, {"model_max_length": INTERNVL_MAX_LENGTH}
    else:
        specials, extra, limit = QWEN_SPECIALS, QWEN_SPECIALS[1:], {}
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   padding_side="left", extra_special_tokens=extra, **limit)
