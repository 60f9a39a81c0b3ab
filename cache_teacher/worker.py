"""The teacher worker: loads the teacher once and turns data shards into committed cache shards.

Used in the driver process (``--workers 0``) and as a Ray actor; everything it needs arrives as a
plain ``WorkerSettings`` so it pickles cheaply. With codec ``quant2`` the maps are quantised on the
teacher's device (``prepare_blocks``): only codes (1-2 bytes per entry) cross to the host, where the
writer's thread pool runs the entropy stage while the GPU computes the next batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.attention.capture import AttentionCapture, enable_capture
from pipeline.attention.layout import TilingPolicy, build_layout, collate_inputs
from pipeline.attention.maps import dense_to_tril, group_layers, group_mean, tv_block
from pipeline.cache.codec2 import ContextQuantCodec, Quantised
from pipeline.cache.codecs import Codec, codec_from_description
from pipeline.cache.writer import CacheShardWriter
from pipeline.data.shards import ShardError, iter_shard
from pipeline.models.load import load_model
from pipeline.models.processors import load_processor
from schemas.cache import SignalSpec
from schemas.method import SIGNAL_ROLE, SIGNAL_TERM, SIGNALS, LayerPlan


class CacheJobError(RuntimeError):
    """A failure while caching one shard; the message names the shard and the sample key."""


def signal_plan(num_layers: int, signals: list[str], *, mid_start: int = 0, mid_end: int = -2,
                student_layers: int | None = None) -> dict[str, SignalSpec]:
    """Teacher layers behind each requested signal (METHOD section 3, ``LayerPlan``).

    first_tv: layer 0; penult_tv: layer L-2; mid: layers ``mid_start..mid_end`` (inclusive, negative
    from the end), pre-grouped for a student of ``student_layers`` decoder layers when given.
    """
    unknown = sorted(set(signals) - set(SIGNALS))
    if unknown or not signals:
        raise ValueError(f"signals {signals}: choose one or more of {list(SIGNALS)}")
    layer_plan = LayerPlan.for_model(num_layers, mid_start, mid_end)
    plan = {}
    for signal in (s for s in SIGNALS if s in signals):
        layers = layer_plan.term_layers(SIGNAL_TERM[signal])
        groups = None
        if signal == "mid" and student_layers is not None:
            groups = group_layers(len(LayerPlan.for_model(student_layers, mid_start, mid_end).mid), layers)
        plan[signal] = SignalSpec(layers=layers, role=SIGNAL_ROLE[signal], groups=groups)
    return plan


def capture_layers(plan: dict[str, SignalSpec]) -> list[int]:
    return sorted({layer for spec in plan.values() for layer in spec.layers})


def sample_blocks(maps: dict[int, torch.Tensor], is_vision: torch.Tensor,
                  plan: dict[str, SignalSpec]) -> dict[str, torch.Tensor]:
    """One sample's stored blocks from its [S, S] head-mean maps, on the maps' device.

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
    return blocks


def slice_sample(maps: dict[int, torch.Tensor], is_vision: torch.Tensor,
                 plan: dict[str, SignalSpec]) -> dict[str, np.ndarray]:
    """``sample_blocks`` as float32 numpy on the host."""
    return {name: block.float().cpu().numpy() for name, block in sample_blocks(maps, is_vision, plan).items()}


def prepare_blocks(codec: Codec, blocks: dict[str, torch.Tensor]) -> dict[str, np.ndarray | Quantised]:
    """What the writer takes: ``quant2`` quantises on the blocks' device (codes cross to the host),
    every other codec gets float32 numpy."""
    if not isinstance(codec, ContextQuantCodec):
        return {name: block.float().cpu().numpy() for name, block in blocks.items()}
    return {name: codec.quantise_signal(name, block) for name, block in blocks.items()}


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
    gpus: float = 0.0
    """GPUs this worker was given (a Ray actor's num_gpus; 0: CPU)."""
    trust_remote_code: bool = False


def device_map_for(gpus: float) -> str | None:
    """The teacher's device map from what THIS process sees (queried in the worker, never the driver):
    None (CPU) without GPUs, "cuda" for one, "auto" (layers spread over the visible devices) for several."""
    if gpus <= 0:
        return None
    if not torch.cuda.is_available():
        raise CacheJobError(f"this worker was given {gpus:g} GPU(s) but sees no CUDA device (torch "
                            f"{torch.__version__}, CUDA build {torch.version.cuda}); check the node's driver, or "
                            "pass --gpus-per-worker 0 to cache on CPUs")
    return "auto" if gpus > 1 and torch.cuda.device_count() > 1 else "cuda"


class TeacherCacher:
    """Holds the teacher (loaded once) and writes cache shards."""

    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self.plan = {name: SignalSpec(**spec) for name, spec in settings.plan.items()}
        self.codec = codec_from_description(settings.codec)
        self.tiling = TilingPolicy(**settings.tiling)
        self.model = load_model(settings.teacher_dir, dtype=settings.dtype, device_map=device_map_for(settings.gpus),
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
            # a ShardError names the sample it could not read; ``key`` is the last one read successfully
            named = isinstance(err, ShardError) or not key
            where = f"shard {index} ({shard_path})" + ("" if named else f", sample {key}")
            raise CacheJobError(f"{where}: {type(err).__name__}: {str(err).rstrip('.')}. The cache shard stays "
                                "uncommitted; fix the cause and re-run the same command to resume.") from err

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
            writer.add(row, prepare_blocks(self.codec, sample_blocks(maps, layout.is_vision, self.plan)))
        if progress is not None:
            progress(len(batch))
