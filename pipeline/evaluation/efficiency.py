"""Deployment metrics as in the Drive-KD paper's Table 1: peak memory, throughput, time to first token.

    python -m pipeline.evaluate --efficiency --model models/demo-student --out reports/efficiency.json
    python -m pipeline.evaluate --efficiency --real-shape InternVL3-1B --views 6 --out reports/internvl3-1b.json

Method. A fixed, deterministic prompt set: `--prompts` prompts, each `--views` drawn camera images (seeded
shapes on a road-coloured background) and one of `QUESTIONS`, laid out by the layout builder
(`pipeline.layout.build_prompt`) exactly as evaluation does. Batch size 1, greedy, and every call
generates exactly `--max-new-tokens` tokens (end-of-sequence is suppressed, as LLM benchmark tools do,
so every model does the same work). One uncounted warm-up call runs first. A streamer timestamps each
generated token:
- time to first token (TTFT) = first token - call start (image encoding, prefill, first step); the
  median over prompts is reported;
- throughput = generated tokens / generate time, summed over prompts (prefill included);
  decode throughput = tokens after the first / time after the first token.
Memory: on CUDA, `torch.cuda.max_memory_allocated` from before the model is loaded to the end (weights,
activations, KV cache), in GiB (2^30 bytes; version 1 reports gave GB = 1e9 bytes under `peak_memory_gb`).
On CPU, the resident set size's high-water above its value at the start ("cpu_rss_above_start",
`pipeline.measure.results.PeakMemory`): coarser (allocator caches, Python objects).

`--real-shape NAME` needs no checkpoint: it builds a random-initialised model with NAME's published
shapes (`pipeline.models.real_config`) directly on the device, and, since the real tokenizer is not
available, feeds random token ids in a real prompt's layout (text tokens, then per view the real number
of image tokens framed like the processor does, then the question and the assistant header) with random
pixel values. Memory, time and throughput depend on the shapes, sequence lengths, dtype and kernels,
not on weight or token values, so the figures stand for the real checkpoint's.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText
from transformers.generation.streamers import BaseStreamer

from pipeline.attention.layout import IMAGE_PLACEHOLDER, build_prompt
from pipeline.measure.results import PeakMemory
from pipeline.models.load import DTYPES, load_model, resolve_model
from pipeline.models.processors import load_processor
from pipeline.models.shapes import real_config
from schemas.qa import ImageRef, QARecord

EFFICIENCY_FORMAT = "drive-kd/efficiency"
EFFICIENCY_VERSION = 2
QUESTIONS = (
    "What objects are in front of the ego vehicle, and where are they?",
    "Is any road user likely to cross the ego lane in the next few seconds? Explain.",
    "What should the ego vehicle do next, and why?",
    "Describe the traffic lights and signs that apply to the ego vehicle.",
)
CAMERAS = ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK_RIGHT", "CAM_BACK")
DRAWN_IMAGE_SIZE = (640, 360)
REAL_TILE = 448
"""Tile side of one image (METHOD section 2) for real-shape Qwen2.5-VL inputs."""
SYNTHETIC_TEXT_TOKENS = (12, 40, 5)
"""Random text tokens of a real-shape prompt: before the images, question after them, assistant header."""


def device_problem(device: str | None) -> str | None:
    """Why `device` cannot be used here (None if it can, or if it is None: the default is picked later)."""
    if device is None:
        return None
    try:
        kind = torch.device(device).type
    except RuntimeError:
        return f"device {device!r} is not a device name; use cpu, cuda or cuda:N"
    if kind not in ("cpu", "cuda"):
        return f"device {device!r}: only cpu and cuda are supported"
    if kind == "cuda" and not torch.cuda.is_available():
        return f"device {device!r}: no CUDA GPU is visible to torch here; use --device cpu"
    return None


def to_device(batch: dict, device, dtype: torch.dtype) -> dict:
    """Move model inputs to `device`; floating tensors (pixel values) also to the model's dtype."""
    return {name: value.to(device, dtype=dtype) if value.is_floating_point() else value.to(device)
            for name, value in batch.items()}


@dataclass
class EfficiencyConfig:
    """One deployment benchmark. Validated on construction; all problems are reported in one ValueError."""

    model: str | None = None
    """Model folder or known name (its processor builds the prompts); exclusive with real_shape."""
    real_shape: str | None = None
    """Name with published shapes (pipeline.models.real_config): random weights, random token ids."""
    out: str | None = None
    """JSON file to write; None: print the JSON only."""
    prompts: int = 8
    max_new_tokens: int = 64
    views: int = 1
    """Camera images per prompt: 1 (front camera) or 6 (nuScenes surround)."""
    device: str | None = None
    """cpu, cuda or cuda:N; default cuda when available."""
    dtype: str | None = None
    """bf16, fp16 or fp32; default bf16 on cuda, fp32 on cpu."""
    allow_cpu: bool = False
    """Allow a real-shape model on CPU (very slow: a full-size model)."""
    seed: int = 0
    """Seed of the drawn images and random inputs."""

    def __post_init__(self) -> None:
        problems = []
        if (self.model is None) == (self.real_shape is None):
            problems.append("give exactly one of --model DIR and --real-shape NAME")
        if self.real_shape is not None:
            try:
                real_config(self.real_shape)
            except ValueError as err:
                problems.append(str(err))
        for field in ("prompts", "max_new_tokens"):
            if getattr(self, field) < 1:
                problems.append(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.views not in (1, 6):
            problems.append(f"views must be 1 or 6, got {self.views}")
        if self.dtype is not None and self.dtype not in DTYPES:
            problems.append(f"dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        problem = device_problem(self.device)
        if problem:
            problems.append(problem)
        if problems:
            raise ValueError("invalid efficiency settings:\n  " + "\n  ".join(problems))
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = self.dtype or ("bf16" if self.device.startswith("cuda") else "fp32")
        if self.real_shape is not None and self.device == "cpu" and not self.allow_cpu:
            raise ValueError(
                f"--real-shape {self.real_shape} builds a full-size random model, which is meant for a GPU; "
                "no CUDA device is in use here. Fix: run on a machine with a CUDA GPU, or pass --allow-cpu "
                "to run it on the CPU anyway (slow; CPU figures are not comparable with the paper's).")


# ---------------------------------------------------------------- prompts


def drawn_images(views: int, rng: random.Random) -> list[Image.Image]:
    """`views` deterministic camera-like images: road, horizon, coloured boxes standing for road users."""
    images = []
    width, height = DRAWN_IMAGE_SIZE
    for _ in range(views):
        image = Image.new("RGB", DRAWN_IMAGE_SIZE, (110, 150, 200))
        draw = ImageDraw.Draw(image)
        draw.rectangle([0, height // 2, width, height], fill=(70, 70, 75))
        for _ in range(rng.randint(2, 6)):
            x, y = rng.randrange(0, width - 80), rng.randrange(height // 2 - 40, height - 60)
            colour = tuple(rng.randrange(256) for _ in range(3))
            draw.rectangle([x, y, x + rng.randint(20, 80), y + rng.randint(20, 60)], fill=colour)
        images.append(image)
    return images


def processor_prompts(processor, *, prompts: int, views: int, seed: int) -> list[dict]:
    """The benchmark prompts as the model's processor lays them out (batch-of-one model inputs)."""
    rng = random.Random(seed)
    cameras = CAMERAS if views == 6 else ("CAM_FRONT",)
    inputs = []
    for index in range(prompts):
        refs = tuple(ImageRef(view=camera, file="", source_path=f"{camera}.png") for camera in cameras)
        record = QARecord(key=f"bench{index}", capability="perception", images=refs,
                          question=f"{IMAGE_PLACEHOLDER}\n" * views + QUESTIONS[index % len(QUESTIONS)],
                          answer="", source="efficiency", index=index)
        inputs.append(build_prompt(record, drawn_images(views, rng), processor))
    return inputs


def _random_text(count: int, allowed: torch.Tensor, generator: torch.Generator) -> list[int]:
    return allowed[torch.randint(len(allowed), (count,), generator=generator)].tolist()


def synthetic_inputs(config, *, views: int, generator: torch.Generator,
                     text_tokens: tuple[int, int, int] = SYNTHETIC_TEXT_TOKENS) -> dict:
    """Batch-of-one inputs in a real prompt's layout for an InternVL or Qwen2.5-VL config, random values.

    ``text_tokens``: random text tokens before the images, after them (the question) and at the end
    (the assistant header; an answer when a sample is wanted for training or caching).

    InternVL: per view `<img>` + image_seq_length image tokens + `</img>\\n`; pixel_values
    [views, 3, T, T] with T the vision tower's image size. Qwen2.5-VL: per view vision_start + (T/patch)^2 /
    merge^2 image tokens + vision_end; pixel_values [views * (T/patch)^2, 3 * temporal_patch * patch^2]
    with T = REAL_TILE, image_grid_thw [views, 3], mm_token_type_ids marking the image tokens.
    Text ids are drawn from the vocabulary without the image/video/vision-frame ids.
    """
    text_config = config.get_text_config()
    reserved = {getattr(config, name, None) for name in
                ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    keep = torch.ones(text_config.vocab_size, dtype=torch.bool)
    keep[[token for token in reserved if token is not None]] = False
    allowed = torch.nonzero(keep).flatten()
    before, question, header = (_random_text(n, allowed, generator) for n in text_tokens)
    qwen = config.model_type == "qwen2_5_vl"
    vision = config.vision_config
    if qwen:
        side = REAL_TILE // vision.patch_size
        per_view = side * side // vision.spatial_merge_size ** 2
        frame = ([config.vision_start_token_id], [config.vision_end_token_id])
        patch_dim = 3 * vision.temporal_patch_size * vision.patch_size ** 2
        pixels = {"pixel_values": torch.randn(views * side * side, patch_dim, generator=generator),
                  "image_grid_thw": torch.tensor([[1, side, side]] * views)}
    else:
        size = vision.image_size[0] if isinstance(vision.image_size, (list, tuple)) else vision.image_size
        per_view = config.image_seq_length
        frame = (_random_text(1, allowed, generator), _random_text(2, allowed, generator))
        pixels = {"pixel_values": torch.randn(views, 3, size, size, generator=generator)}
    ids = list(before)
    for _ in range(views):
        ids += frame[0] + [config.image_token_id] * per_view + frame[1]
    input_ids = torch.tensor([ids + question + header])
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **pixels}
    if qwen:
        inputs["mm_token_type_ids"] = (input_ids == config.image_token_id).int()
    return inputs


# ---------------------------------------------------------------- measurement


class TokenClock(BaseStreamer):
    """Streamer that timestamps every generated token (generate first passes the prompt, then each token)."""

    def __init__(self, sync: Callable[[], None]):
        self.sync = sync
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.sync()  # the token must exist before it is timed
        self.times.append(time.perf_counter())

    def end(self) -> None:
        """Nothing to flush: the timestamps are the output."""


def time_generation(model, inputs: dict, *, max_new_tokens: int, sync: Callable[[], None]) -> dict[str, Any]:
    """Generate exactly `max_new_tokens` tokens greedily for one prompt; prompt/new tokens, TTFT, times."""
    clock = TokenClock(sync)
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                                min_new_tokens=max_new_tokens, streamer=clock,
                                pad_token_id=0)  # batch of one: nothing is padded, the id only silences a warning
    sync()
    total = time.perf_counter() - start
    prompt_tokens = inputs["input_ids"].shape[1]
    return {"prompt_tokens": prompt_tokens, "new_tokens": output.shape[1] - prompt_tokens,
            "ttft_s": clock.times[0] - start, "decode_s": clock.times[-1] - clock.times[0], "total_s": total}


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine() or "unknown CPU"


def _load(config: EfficiencyConfig) -> tuple[Any, list[dict], str]:
    """(model on the device, benchmark inputs, model name)."""
    dtype = DTYPES[config.dtype]
    if config.real_shape is not None:
        model_config = real_config(config.real_shape)
        with torch.device(config.device):
            model = AutoModelForImageTextToText.from_config(model_config, dtype=dtype)
        generator = torch.Generator().manual_seed(config.seed)
        inputs = [synthetic_inputs(model_config, views=config.views, generator=generator)
                  for _ in range(config.prompts)]
        return model.eval(), inputs, config.real_shape
    model_dir = resolve_model(config.model)
    inputs = processor_prompts(load_processor(model_dir), prompts=config.prompts, views=config.views,
                               seed=config.seed)
    return load_model(model_dir, dtype=config.dtype).to(config.device).eval(), inputs, str(model_dir)


def measure(config: EfficiencyConfig) -> dict[str, Any]:
    """Run the benchmark; returns the report (see the module docstring for what each figure means)."""
    cuda = config.device.startswith("cuda")
    sync = (lambda: torch.cuda.synchronize(config.device)) if cuda else (lambda: None)
    if cuda:
        torch.cuda.empty_cache()
    with PeakMemory(torch.device(config.device)) as memory:
        model, inputs, name = _load(config)
        inputs = [to_device(item, config.device, model.dtype) for item in inputs]
        time_generation(model, inputs[0], max_new_tokens=min(2, config.max_new_tokens), sync=sync)  # warm-up
        runs = [time_generation(model, item, max_new_tokens=config.max_new_tokens, sync=sync) for item in inputs]
    new_tokens = sum(run["new_tokens"] for run in runs)
    decode_s = sum(run["decode_s"] for run in runs)
    text_config = model.config.get_text_config()
    return {
        "format": EFFICIENCY_FORMAT, "version": EFFICIENCY_VERSION,
        "model": name, "real_shape": config.real_shape is not None,
        "device": {"kind": "cuda" if cuda else "cpu", "name": _device_name(config.device),
                   "torch_threads": torch.get_num_threads()},
        "dtype": config.dtype,
        "peak_memory_gib": memory.read_gib(),
        "memory_kind": memory.kind,
        "tokens_per_s": new_tokens / sum(run["total_s"] for run in runs),
        "decode_tokens_per_s": (new_tokens - len(runs)) / decode_s if decode_s > 0 else None,
        "ttft_median_s": statistics.median(run["ttft_s"] for run in runs),
        "shapes": {
            "prompts": len(runs), "views": config.views, "batch_size": 1, "max_new_tokens": config.max_new_tokens,
            "prompt_tokens": [run["prompt_tokens"] for run in runs],
            "vision_tokens_per_prompt": int((inputs[0]["input_ids"] == model.config.image_token_id).sum()),
            "parameters": sum(p.numel() for p in model.parameters()),
            "text_layers": text_config.num_hidden_layers, "hidden_size": text_config.hidden_size,
        },
        "per_prompt": runs,
        "settings": asdict(config),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Deployment metrics of a driving VLM as in the Drive-KD paper's Table 1: peak "
        "memory (GiB), generation throughput (tokens/s) and median time to first token (s), batch size 1, over "
        "a fixed prompt set. See pipeline/efficiency.py for the method.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model folder (save_pretrained) or known name under $MODEL_DIR")
    source.add_argument("--real-shape", help="random-initialised model with this checkpoint's published shapes "
                        "(e.g. InternVL3-1B; GPU benchmark, no weights needed)")
    parser.add_argument("--out", help="write the JSON report here (default: print it)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts measured (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt (default 64)")
    parser.add_argument("--views", type=int, choices=(1, 6), default=1, help="camera images per prompt (default 1)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--allow-cpu", action="store_true", help="allow --real-shape on CPU (slow)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the drawn images / random inputs (default 0)")
    return parser


def main(argv: list[str] | None = None, *, prog: str = "python -m pipeline.efficiency") -> None:
    args = build_parser(prog).parse_args(argv)
    try:
        report = measure(EfficiencyConfig(**vars(args)))
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    text = json.dumps(report, indent=2)
    if args.out is None:
        print(text)
        return
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n", encoding="utf-8")
    print(f"{report['model']} on {report['device']['name']} ({report['dtype']}): "
          f"peak memory {report['peak_memory_gib']:.2f} GiB ({report['memory_kind']}), "
          f"{report['tokens_per_s']:.1f} tokens/s, median TTFT {report['ttft_median_s']:.3f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
