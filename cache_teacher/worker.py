"""The teacher worker: loads the teacher once and turns data shards into committed cache shards.

Used in the driver process (``--workers 0``) and as a Ray actor; everything it needs arrives as a
plain ``WorkerSettings`` so it pickles cheaply.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.attention.capture import AttentionCapture, enable_capture
from pipeline.attention.layout import TilingPolicy, build_layout, collate_inputs
from pipeline.attention.maps import dense_to_tril, group_layers, group_mean, resolve_layer_range, tv_block
from pipeline.cache.codecs import codec_from_description
from pipeline.cache.writer import CacheShardWriter
from pipeline.data.shards import iter_shard
from pipeline.models.load import load_model
from pipeline.models.processors import load_processor
from schemas.cache import SIGNAL_ROLES, SIGNALS, SignalSpec


class CacheJobError(RuntimeError):
    """A failure while caching one shard; the message names the shard and the sample key."""


def signal_plan(num_layers: int, signals: list[str], *, mid_start: int = 0, mid_end: int = -2,
                student_layers: int | None = None) -> dict[str, SignalSpec]:
    """Teacher layers behind each requested signal (METHOD section 3).

    first_tv: layer 0; penult_tv: layer L-2; mid: layers ``mid_start..mid_end`` (inclusive, negative
    from the end), pre-grouped for a student of ``student_layers`` decoder layers when given.
    """
    unknown = sorted(set(signals) - set(SIGNALS))
    if unknown or not signals:
        raise ValueError(f"signals {signals}: choose one or more of {list(SIGNALS)}")
    if num_layers < 2:
        raise ValueError(f"the teacher has {num_layers} decoder layer(s); the penultimate layer needs at least 2")
    plan = {}
    for signal in SIGNALS:
        if signal not in signals:
            continue
        if signal == "first_tv":
            plan[signal] = SignalSpec(layers=[0], role=SIGNAL_ROLES[signal])
        elif signal == "penult_tv":
            plan[signal] = SignalSpec(layers=[num_layers - 2], role=SIGNAL_ROLES[signal])
        else:
            layers = resolve_layer_range(mid_start, mid_end, num_layers)
            groups = None
            if student_layers is not None:
                k = len(resolve_layer_range(mid_start, mid_end, student_layers))
                groups = group_layers(k, layers)
            plan[signal] = SignalSpec(layers=layers, role=SIGNAL_ROLES[signal], groups=groups)
    return plan


def capture_layers(plan: dict[str, SignalSpec]) -> list[int]:
    return sorted({layer for spec in plan.values() for layer in spec.layers})


def slice_sample(maps: dict[int, torch.Tensor], is_vision: torch.Tensor,
                 plan: dict[str, SignalSpec]) -> dict[str, np.ndarray]:
    """One sample's stored blocks from its [S, S] head-mean maps (on the model's device).

    first_tv / penult_tv: [n_text, n_vision]; mid: [n_maps, S*(S+1)/2] packed lower triangles,
    one per teacher layer, or one group mean per student layer when pre-grouped.
    """
    blocks = {}
    for signal, spec in plan.items():
        if signal == "mid":
            stack = torch.stack([maps[layer] for layer in spec.layers])
            if spec.groups is not None:
                stack = group_mean(stack, len(spec.groups))
            blocks[signal] = dense_to_tril(stack)
        else:
            blocks[signal] = tv_block(maps[spec.layers[0]], is_vision)
    return {name: block.float().cpu().numpy() for name, block in blocks.items()}


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker needs to cache shards: teacher, plan, storage and batching."""

    teacher_dir: str
    dtype: str
    plan: dict
    codec: dict
    root: str
    tiling: dict
    batch_size: int = 1
    device_map: str | None = None
    trust_remote_code: bool = False


class TeacherCacher:
    """Holds the teacher (loaded once) and writes cache shards."""

    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self.plan = {name: SignalSpec(**spec) for name, spec in settings.plan.items()}
        self.codec = codec_from_description(settings.codec)
        self.tiling = TilingPolicy(**settings.tiling)
        self.model = load_model(settings.teacher_dir, dtype=settings.dtype, device_map=settings.device_map,
                                trust_remote_code=settings.trust_remote_code).eval()
        enable_capture(self.model)
        self.processor = load_processor(settings.teacher_dir)
        self.pad_id = self.processor.tokenizer.pad_token_id

    def process_shard(self, index: int, shard_path: str, expected_samples: int, progress=None) -> dict:
        """Cache every sample of data shard ``index``; commit the cache shard last. Returns its metadata."""
        key = None
        try:
            with CacheShardWriter(root=self.settings.root, index=index, codec=self.codec,
                                  signals=list(self.plan)) as writer:
                batch = []
                for sample in iter_shard(shard_path, expected_samples=expected_samples):
                    key = sample.key
                    batch.append((sample, build_layout(sample.record, sample.images, self.processor,
                                                       tiling=self.tiling)))
                    if len(batch) == self.settings.batch_size:
                        self._write_batch(writer, batch, progress)
                        batch = []
                if batch:
                    self._write_batch(writer, batch, progress)
                return writer.commit()
        except Exception as err:
            where = f"shard {index} ({shard_path})" + (f", sample {key}" if key else "")
            raise CacheJobError(f"{where}: {type(err).__name__}: {err}. The cache shard stays uncommitted; "
                                "fix the cause and re-run the same command to resume.") from err

    @torch.no_grad()
    def _write_batch(self, writer: CacheShardWriter, batch: list, progress) -> None:
        inputs = collate_inputs([layout.model_inputs for _, layout in batch], self.pad_id)
        inputs = {k: v.to(self.model.device) for k, v in inputs.items()}
        with AttentionCapture(self.model, capture_layers(self.plan)) as cap:
            self.model(**inputs)
        s_max = inputs["input_ids"].shape[1]
        for b, (sample, layout) in enumerate(batch):
            pad = s_max - layout.seq_len
            maps = {layer: m[b, pad:, pad:] for layer, m in cap.maps.items()}
            row = {"key": sample.key, "shard": writer.index, "capability": sample.record.capability,
                   "seq_len": layout.seq_len, "n_text": layout.n_text, "n_vision": layout.n_vision,
                   "layout_digest": layout.digest, "layout": json.dumps(layout.summary(), separators=(",", ":"))}
            writer.add(row, slice_sample(maps, layout.is_vision, self.plan))
        if progress is not None:
            progress(len(batch))
