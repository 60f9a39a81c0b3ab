"""Model resolution and loading.

``resolve_model`` maps a directory or a known checkpoint name to a local ``save_pretrained``
directory; ``load_model`` opens it with native transformers classes (no remote code unless asked).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

from pipeline.models.processors import (
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
