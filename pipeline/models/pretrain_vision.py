"""Dense pretraining of a tiny model's vision tower and projector on generated scenes.

A real driving VLM starts from a vision encoder pretrained on billions of images (InternViT, Qwen's ViT);
a tiny random-initialised model has none, and a VLM trained from scratch on multiple-choice answers alone
gets one bit of supervision per image. This stage gives the tiny model's image tokens what a pretrained
encoder gives a real one: features from which the scene's content can be read. Each of the model's own
image tokens (after InternVL's pixel shuffle or Qwen's patch merger, and the projector: exactly what the
language model receives) is trained with linear heads to predict the road user, traffic light and sign
it covers, taken from the scene model that drew the image (kind, colour, lane, moving or stopped, light
state, sign). The heads are thrown away; the tower and projector keep the features.

The labels are scene facts, never answers: no question, option or plan enters this stage, and the scenes
come from their own seeded stream ("vision/{seed}"), so no QA split's scene is seen here.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.data.scenes import (
    COLOURS,
    FRONT,
    KINDS,
    LIGHT_BOX,
    LIGHT_STATES,
    SIGN_CENTRE,
    SIGN_RADIUS,
    SIGNS,
    SURROUND,
    render,
    sample_scene,
)

LANE_LABELS = ("left", "ego", "right", "left_sidewalk", "right_sidewalk", "crosswalk")
HEADS = {  # head -> class names; class 0 ("none") is a token that shows no such thing
    "kind": ("none", *KINDS),
    "colour": ("none", *COLOURS),
    "lane": ("none", *LANE_LABELS),
    "motion": ("none", "moving", "stopped"),
    "light": ("none", *LIGHT_STATES),
    "sign": ("none", *SIGNS),
}
CLAIM = 0.25
"""a thing labels a token when it covers this fraction of the token's cell or of itself (whichever is smaller)"""


@dataclass(frozen=True)
class Settings:
    scenes: int = 2000
    """training scenes (one image each: CAM_FRONT, or a random camera of a surround scene)"""
    steps: int = 1500
    batch: int = 32
    lr: float = 2e-3
    seed: int = 0
    heldout: int = 200
    """held-out scenes (seed stream "vision/{seed}/heldout") for the accuracy report"""
    surround: float = 0.25
    """fraction of scenes drawn with 6 surround cameras (one camera of each is used)"""
    shown_weight: float = 4.0
    """loss weight of a token that shows a road user, light or sign (against 1 for road, grass, sky)"""


def _cover(box, cell) -> float:
    """Overlap of two normalised boxes as a fraction of the smaller one's area."""
    width = min(box[2], cell[2]) - max(box[0], cell[0])
    height = min(box[3], cell[3]) - max(box[1], cell[1])
    if width <= 0 or height <= 0:
        return 0.0
    smaller = min((box[2] - box[0]) * (box[3] - box[1]), (cell[2] - cell[0]) * (cell[3] - cell[1]))
    return width * height / max(smaller, 1e-12)


def token_labels(scene, camera: str, grid: int) -> np.ndarray:
    """int64 [len(HEADS), grid * grid]: each image token's class per head (row-major cells over the image)."""
    labels = np.zeros((len(HEADS), grid, grid), dtype=np.int64)
    index = {name: i for i, name in enumerate(HEADS)}
    things = []  # (box, {head: class}) in drawing order: light and sign first, then far to near
    if camera == FRONT and scene.light is not None:
        things.append((LIGHT_BOX, {"light": HEADS["light"].index(scene.light)}))
    if camera == FRONT and scene.sign is not None:
        cx, cy, r = *SIGN_CENTRE, SIGN_RADIUS
        things.append(((cx - r, cy - r, cx + r, cy + r), {"sign": HEADS["sign"].index(scene.sign)}))
    for obj in sorted(scene.in_camera(camera), key=lambda o: -o.distance):
        things.append((obj.box, {"kind": HEADS["kind"].index(obj.kind), "colour": HEADS["colour"].index(obj.colour),
                                 "lane": HEADS["lane"].index(obj.lane),
                                 "motion": 1 if obj.moving else 2}))
    for box, classes in things:
        for row in range(grid):
            for col in range(grid):
                cell = (col / grid, row / grid, (col + 1) / grid, (row + 1) / grid)
                if _cover(box, cell) >= CLAIM:
                    labels[:, row, col] = 0
                    for head, value in classes.items():
                        labels[index[head], row, col] = value
    return labels.reshape(len(HEADS), grid * grid)


def scene_images(count: int, stream: str, surround: float, size: int):
    """`count` (PIL image, scene, camera) of generated scenes from the seeded stream `stream`."""
    rng = random.Random(stream)
    out = []
    for i in range(count):
        cameras = SURROUND if rng.random() < surround else (FRONT,)
        scene = sample_scene(rng, f"vision-{i}", cameras)
        camera = rng.choice(cameras)
        out.append((render(scene, camera, size), scene, camera))
    return out


class ImageTokens:
    """The model's image tokens as the language model receives them: [images, tokens, hidden], row-major."""

    def __init__(self, model, processor):
        self.model, self.processor = model, processor
        self.family = "qwen" if "qwen" in model.config.model_type else "internvl"

    def pixels(self, images) -> dict:
        if self.family == "qwen":
            out = self.processor.image_processor(images=images, return_tensors="pt")
            return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}
        out = self.processor.image_processor(images=images, return_tensors="pt", crop_to_patches=False)
        return {"pixel_values": out["pixel_values"]}

    def __call__(self, inputs: dict, images: int) -> torch.Tensor:
        if self.family == "qwen":
            features = self.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        else:
            features = self.model.model.get_image_features(
                inputs["pixel_values"], vision_feature_layer=self.model.config.vision_feature_layer,
                vision_feature_select_strategy=self.model.config.vision_feature_select_strategy)
        features = getattr(features, "pooler_output", features)
        if isinstance(features, (list, tuple)):
            features = torch.cat(list(features))
        return features.reshape(images, -1, features.shape[-1])


def _select(pixels: dict, idx: torch.Tensor, family: str, per_image: int) -> dict:
    if family == "qwen":  # patches of image i are rows [i * per_image, (i + 1) * per_image)
        rows = (idx[:, None] * per_image + torch.arange(per_image)).reshape(-1)
        return {"pixel_values": pixels["pixel_values"][rows], "image_grid_thw": pixels["image_grid_thw"][idx]}
    return {"pixel_values": pixels["pixel_values"][idx]}


def _encode(tokens: ImageTokens, images) -> tuple[dict, int]:
    pixels = tokens.pixels(images)
    per_image = pixels["pixel_values"].shape[0] // len(images) if tokens.family == "qwen" else 1
    return pixels, per_image


def accuracy(tokens: ImageTokens, heads: nn.ModuleDict, pixels: dict, labels: torch.Tensor, per_image: int,
             batch: int = 64) -> dict:
    """Held-out accuracy per head (labels [images, tokens, heads]) over the tokens that show something
    (class != none) and over all tokens."""
    correct = {h: [0, 0, 0, 0] for h in HEADS}  # shown right, shown, all right, all
    with torch.no_grad():
        for start in range(0, labels.shape[0], batch):
            idx = torch.arange(start, min(start + batch, labels.shape[0]))
            feats = tokens(_select(pixels, idx, tokens.family, per_image), len(idx))
            batch_labels = labels[idx]
            for i, head in enumerate(HEADS):
                target = batch_labels[..., i]
                guess = heads[head](feats).argmax(-1)
                shown = target != 0
                correct[head][0] += int((guess == target)[shown].sum())
                correct[head][1] += int(shown.sum())
                correct[head][2] += int((guess == target).sum())
                correct[head][3] += target.numel()
    return {h: {"shown": round(100 * c[0] / max(c[1], 1), 2), "all": round(100 * c[2] / max(c[3], 1), 2),
                "shown_tokens": c[1]} for h, c in correct.items()}


def pretrain(model, processor, settings: Settings, *, progress=None) -> dict:
    """Trains the vision tower and projector of `model` in place; returns the report (held-out accuracy)."""
    torch.manual_seed(settings.seed)
    tokens = ImageTokens(model, processor)
    size = _image_size(processor)
    train = scene_images(settings.scenes, f"vision/{settings.seed}", settings.surround, size)
    held = scene_images(settings.heldout, f"vision/{settings.seed}/heldout", settings.surround, size)
    pixels, per_image = _encode(tokens, [image for image, _, _ in train])
    held_pixels, _ = _encode(tokens, [image for image, _, _ in held])
    with torch.no_grad():
        grid = int(round(tokens(_select(pixels, torch.arange(1), tokens.family, per_image), 1).shape[1] ** 0.5))
    labels = torch.from_numpy(np.stack([token_labels(s, c, grid) for _, s, c in train])).transpose(1, 2)
    held_labels = torch.from_numpy(np.stack([token_labels(s, c, grid) for _, s, c in held])).transpose(1, 2)
    hidden = model.config.get_text_config().hidden_size
    heads = nn.ModuleDict({h: nn.Linear(hidden, len(classes)) for h, classes in HEADS.items()})
    trained = _trainable(model)
    params = [p for p in trained.parameters() if p.requires_grad] + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.01)
    warmup = min(100, settings.steps // 10 + 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1 - s / settings.steps))
    generator = torch.Generator().manual_seed(settings.seed)
    model.train()
    started, losses = time.perf_counter(), []
    for step in range(settings.steps):
        idx = torch.randint(0, labels.shape[0], (settings.batch,), generator=generator)
        feats = tokens(_select(pixels, idx, tokens.family, per_image), len(idx))
        target = labels[idx]
        loss = sum(_head_loss(heads[h](feats), target[..., i], settings.shown_weight)
                   for i, h in enumerate(HEADS)) / len(HEADS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step, losses[-1])
    model.eval()
    return {"settings": asdict(settings), "grid": grid, "seconds": round(time.perf_counter() - started, 1),
            "first_loss": round(float(np.mean(losses[:20])), 4), "last_loss": round(float(np.mean(losses[-20:])), 4),
            "heldout_accuracy": accuracy(tokens, heads, held_pixels, held_labels, per_image)}


def _head_loss(logits: torch.Tensor, target: torch.Tensor, shown_weight: float) -> torch.Tensor:
    """Cross-entropy per token, tokens that show something weighted `shown_weight` (most tokens show road)."""
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    weight = 1.0 + (shown_weight - 1.0) * (target.reshape(-1) != 0).float()
    return (loss * weight).sum() / weight.sum()


def _trainable(model) -> nn.Module:
    """The modules this stage trains: vision tower and projector (the language model is left as it is)."""
    inner = model.model
    return nn.ModuleList([inner.visual] if hasattr(inner, "visual") else [inner.vision_tower, inner.multi_modal_projector])


def _image_size(processor) -> int:
    size = processor.image_processor.size
    if isinstance(size, dict) and "height" in size:
        return int(size["height"])
    return 112


def run(model_dir: str | Path, out: str | Path, settings: Settings, *, progress: bool = True) -> dict:
    """Loads `model_dir`, pretrains its vision side, saves model + processor to `out` with vision_pretrain.json."""
    from pipeline.models.load import load_model
    from pipeline.models.processors import load_processor

    model = load_model(model_dir)
    processor = load_processor(model_dir)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=settings.steps, desc="vision pretraining", unit="step")

    def tick(step, loss):
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")

    report = pretrain(model, processor, settings, progress=tick)
    if bar is not None:
        bar.close()
    out = Path(out)
    if out.resolve() != Path(model_dir).resolve():  # tokenizer, processor and templates exactly as they were
        shutil.copytree(model_dir, out, dirs_exist_ok=True)
    model.save_pretrained(out)
    report["from"] = str(model_dir)
    (out / "vision_pretrain.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
