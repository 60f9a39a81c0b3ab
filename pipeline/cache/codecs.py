"""Codecs that store flat float32 attention blocks in Zarr v3 arrays and read element ranges back.

A cache shard keeps each signal (first_tv, penult_tv, mid) as ONE flat 1-D array per shard: the
blocks of all its samples (and layers) concatenated, written once when the shard is flushed. The
caller knows the logical row structure: `row_lengths[r]` is the number of stored elements of row r
(n_vision for a text-to-vision block, i + 1 for row i of a packed lower triangle), and
`block_rows[b]` is the number of rows of block b (one map of one sample and layer).

Codecs (all frozen dataclasses sharing the same four methods; `CODECS` maps names to them):
- `lossless`: float16, blosc-zstd with byte shuffle. decode(encode(x)) == x.astype(float16).
- `quant`: uniform quantisation, one step per block, tuned and verified at encode time so that every
  block's relative Frobenius error is <= `rel_error`. Attention losses are MSEs, so the absolute
  error is what matters; a uniform step spends bits where the squared error is. Stores integer codes
  (the smallest unsigned dtype that holds them) + a float32 step per row.
- `log8`: 8-bit quantisation of log(x / row_max) over [log(rel_floor), 0]; code 0 = exact zero (x <=
  row_max * rel_floor). Keeps ~1.8% relative precision on every kept entry, small ones included,
  for log-type (KL) or cosine ablations; larger than `quant` at a matched Frobenius error.
- `quant2` (codec format version 2, ``codec2.py``): `quant`'s bounded per-map step, quantised on the
  teacher's device; optionally sink-aware (entry 0 of every row exact, the bound on the rest); an
  adaptive 2-D context model over each map's code image as entropy stage, one blob per map.

Measured on `synthetic_causal_attention` maps (packed lower triangle; chunk bytes against the raw
float16 full S x S map), S=1800 with 6 image spans, 3 seeds: lossless 2.6x (byte shuffle; bitshuffle
was 8% larger, byte-splitting equal, a lossless row-delta filter 7% smaller but it chains rows
across samples; the values sit near their order-0 entropy), quant 12.5-18x at <= 0.95%, log8 4.9x
at ~0.6% (a 1e-3 floor: 5-16x at 1.0-1.3%; 12-bit log codes: 3.2x). Shuffle beat bitshuffle for
the codes too (18.4x vs 15.5x); per-row steps were 10-20% larger than one step per map, and
row-to-row prediction, low-rank predictors and dead-zone rounding did not pay (under zstd; for quant2's
context model, measured on real maps: a 0.65-step dead zone +0.7%, centroid reconstruction of codes 1-3
+1.3%, zeroing isolated ones +1.8%: not adopted, the bound stays a plain uniform quantiser's).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import zarr

from pipeline.attention.maps import dense_to_tril
from pipeline.cache.codec2 import ContextQuantCodec
from pipeline.cache.codec_base import CODEC_FORMAT_VERSION as CODEC_FORMAT_VERSION
from pipeline.cache.codec_base import (
    READABLE_CODEC_VERSIONS,
    NodeParts,
    as_rows,
    as_values,
    check_clevel,
    check_range,
    create_array,
    describe_codec,
    row_range,
)

_LOG8_LEVELS = 254  # codes 1..255 cover the log range; code 0 is an exact zero


# --------------------------------------------------------------------------------------------------
# codecs
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Float16Codec(NodeParts):
    """`lossless`: float16 values, blosc-zstd with byte shuffle. Exact w.r.t. float16.

    Layout: one array `name` (float16) with attrs {"codec": describe()}.
    """

    clevel: int = 5
    name: ClassVar[str] = "lossless"
    since: ClassVar[int] = 1
    lossless: ClassVar[bool] = True

    def __post_init__(self):
        check_clevel(self.clevel)

    def describe(self) -> dict:
        return describe_codec(self)

    def write(self, group: zarr.Group, name: str, values: np.ndarray, *,
              row_lengths=None, block_rows=None) -> None:
        values = as_values(values, non_negative=False)
        as_rows(values.size, row_lengths, block_rows, required=False)
        with np.errstate(over="ignore"):
            half = values.astype(np.float16)
        if not np.isfinite(half).all():
            raise ValueError(f"values exceed the float16 range (max |x| = {np.abs(values).max()}); "
                             "attention probabilities are <= 1, check what is being cached")
        create_array(group, name, half, self.clevel, {"codec": self.describe()})

    def read(self, group: zarr.Group | None, name: str, *, start: int, stop: int,
             row_start: int = 0, row_lengths=None, part=None) -> np.ndarray:
        array = group[name] if part is None else part
        check_range(array, self.describe(), array.shape[0], start, stop)
        return array[start:stop].astype(np.float32)


@dataclass(frozen=True)
class UniformQuantCodec(NodeParts):
    """`quant`: uniform quantisation with a per-block step; relative Frobenius error <= rel_error.

    Encoding of block b (values x, N entries): start from the step that the uniform-noise model
    predicts, step = sqrt(12 * mean(x^2)) * rel_error, correct it twice by the measured error, and
    keep the largest step whose reconstruction codes * step (float32, exactly as decoded) meets the
    bound (norms in float32, so "<=" holds up to float32 rounding). If none does, use
    2 * rel_error * ||x|| / sqrt(N), which meets it by construction (every entry is off by at most
    step / 2). Zeros stay exact zeros; all-zero blocks store code 0. Pass one block per map
    (`block_rows`) to bound every map; without it the whole array is one block.

    Layout: group `name` (attrs {"codec": describe()}) holding `codes` (uint8/16/32, one per value)
    and `step` (float32, one per row; constant within a block).
    """

    rel_error: float = 0.0095
    clevel: int = 5
    name: ClassVar[str] = "quant"
    since: ClassVar[int] = 1
    lossless: ClassVar[bool] = False

    def __post_init__(self):
        if not (isinstance(self.rel_error, float) and 1e-4 <= self.rel_error <= 0.5):
            raise ValueError(f"rel_error must be a float in [1e-4, 0.5] (e.g. 0.0095 for < 1% "
                             f"relative Frobenius error per block; below 1e-4 use 'lossless'), "
                             f"got {self.rel_error!r}")
        check_clevel(self.clevel)

    def describe(self) -> dict:
        return describe_codec(self)

    def _quantise_block(self, x: np.ndarray) -> tuple[np.ndarray, np.float32]:
        norm = float(np.linalg.norm(x))
        if norm == 0.0:
            return np.zeros_like(x), np.float32(1.0)
        best_codes, best_step = None, np.float32(0.0)
        step = np.float32(np.sqrt(12.0 / x.size) * norm * self.rel_error)
        for _ in range(3):
            codes = np.rint(x / step)
            err = float(np.linalg.norm(x - codes * step)) / norm
            if err <= self.rel_error and step > best_step:
                best_codes, best_step = codes, step
            step = np.float32(step * 0.99 * self.rel_error / max(err, 1e-12))
        if best_codes is None:
            best_step = np.float32(2.0 * self.rel_error * norm / np.sqrt(x.size))
            best_codes = np.rint(x / best_step)
        return best_codes, best_step

    def write(self, group: zarr.Group, name: str, values: np.ndarray, *,
              row_lengths=None, block_rows=None) -> None:
        values = as_values(values, non_negative=True)
        lengths, blocks = as_rows(values.size, row_lengths, block_rows, required=True)
        codes = np.zeros(values.size, dtype=np.float32)
        row_step = np.ones(lengths.size, dtype=np.float32)
        row_bounds = np.concatenate([[0], np.cumsum(blocks)])
        elem_bounds = np.concatenate([[0], np.cumsum(lengths)])[row_bounds]
        for b in range(blocks.size):
            lo, hi = elem_bounds[b], elem_bounds[b + 1]
            block_codes, step = self._quantise_block(values[lo:hi])
            codes[lo:hi], row_step[row_bounds[b]:row_bounds[b + 1]] = block_codes, step
        top = codes.max() if codes.size else 0
        assert top < 2**32, f"quantisation code {top} does not fit uint32"
        dtype = next(d for d in (np.uint8, np.uint16, np.uint32) if top <= np.iinfo(d).max)
        node = group.create_group(name, attributes={"codec": self.describe()})
        create_array(node, "codes", codes.astype(dtype), self.clevel)
        create_array(node, "step", row_step, self.clevel)

    def read(self, group: zarr.Group | None, name: str, *, start: int, stop: int,
             row_start: int = 0, row_lengths=None, part=None) -> np.ndarray:
        node = group[name] if part is None else part
        check_range(node, self.describe(), node["codes"].shape[0], start, stop)
        lengths = row_range(stop - start, row_start, row_lengths, node["step"].shape[0])
        step = node["step"][row_start:row_start + lengths.size]
        codes = node["codes"][start:stop].astype(np.float32)
        if step.size and (step == step[0]).all():  # one block: no per-element step array
            return codes * step[0]
        return codes * np.repeat(step, lengths)


@dataclass(frozen=True)
class LogQuantCodec(NodeParts):
    """`log8`: 8-bit codes of log(x / row_max) over [log(rel_floor), 0]; code 0 is an exact zero.

    Entries <= row_max * rel_floor become 0; every kept entry has ~1.8% relative precision
    (log step = -ln(rel_floor) / 254). Layout: group `name` (attrs {"codec": describe()}) holding
    `codes` (uint8, one per value) and `row_max` (float32, one per row).
    """

    rel_floor: float = 1e-4
    clevel: int = 5
    name: ClassVar[str] = "log8"
    since: ClassVar[int] = 1
    lossless: ClassVar[bool] = False

    def __post_init__(self):
        if not (isinstance(self.rel_floor, float) and 0.0 < self.rel_floor < 1.0):
            raise ValueError(f"rel_floor must be a float in (0, 1) (values below "
                             f"row_max * rel_floor are stored as 0), got {self.rel_floor!r}")
        check_clevel(self.clevel)

    def describe(self) -> dict:
        return describe_codec(self)

    def _table(self) -> np.ndarray:
        """Decoded value of each code for row_max = 1: float32 [256]."""
        levels = np.arange(256, dtype=np.float64)
        log_floor = np.log(self.rel_floor)
        table = np.exp(log_floor - (levels - 1) / _LOG8_LEVELS * log_floor)
        table[0] = 0.0
        return table.astype(np.float32)

    def write(self, group: zarr.Group, name: str, values: np.ndarray, *,
              row_lengths=None, block_rows=None) -> None:
        values = as_values(values, non_negative=True)
        lengths, _ = as_rows(values.size, row_lengths, block_rows, required=True)
        row_max = np.zeros(lengths.size, dtype=np.float32)
        nonempty = lengths > 0
        if values.size:
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])[nonempty]
            row_max[nonempty] = np.maximum.reduceat(values, starts)
        scale = np.repeat(row_max, lengths)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_rel = np.log(values / scale)  # in [-inf, 0]; NaN where the row is all zero
        kept = values > scale * self.rel_floor
        span = -np.log(self.rel_floor)
        codes = np.where(kept, 1 + np.rint((log_rel / span + 1.0) * _LOG8_LEVELS), 0)
        node = group.create_group(name, attributes={"codec": self.describe()})
        create_array(node, "codes", np.clip(codes, 0, 255).astype(np.uint8), self.clevel)
        create_array(node, "row_max", row_max, self.clevel)

    def read(self, group: zarr.Group | None, name: str, *, start: int, stop: int,
             row_start: int = 0, row_lengths=None, part=None) -> np.ndarray:
        node = group[name] if part is None else part
        check_range(node, self.describe(), node["codes"].shape[0], start, stop)
        lengths = row_range(stop - start, row_start, row_lengths, node["row_max"].shape[0])
        row_max = node["row_max"][row_start:row_start + lengths.size]
        return self._table()[node["codes"][start:stop]] * np.repeat(row_max, lengths)


Codec = Float16Codec | UniformQuantCodec | LogQuantCodec | ContextQuantCodec
CODECS: dict[str, type[Codec]] = {
    c.name: c for c in (Float16Codec, UniformQuantCodec, LogQuantCodec, ContextQuantCodec)
}
DEFAULT_CODEC = "lossless"


def get_codec(name: str, **params) -> Codec:
    """The codec registered as `name`, built with `params` (its dataclass fields)."""
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; known codecs: {', '.join(sorted(CODECS))}")
    try:
        return CODECS[name](**params)
    except TypeError as exc:
        fields = list(CODECS[name].__dataclass_fields__)
        raise ValueError(f"bad parameters {params} for codec {name!r} ({exc}); "
                         f"its parameters are {fields}") from None


def codec_from_description(description: Mapping) -> Codec:
    """Rebuild a codec from `describe()` output stored in a cache manifest; refuses unknown ones."""
    version = description.get("version")
    if version not in READABLE_CODEC_VERSIONS:
        raise ValueError(f"codec format version {version!r} is not supported by this reader "
                         f"(supports {list(READABLE_CODEC_VERSIONS)}); upgrade drive-kd or rebuild the "
                         "cache")
    name = str(description.get("name"))
    if version < CODECS.get(name, Float16Codec).since:
        raise ValueError(f"codec {name!r} does not exist in codec format version {version}; the description "
                         "is damaged")
    return get_codec(name, **dict(description.get("params", {})))


# --------------------------------------------------------------------------------------------------
# packing, error and size measurement
# --------------------------------------------------------------------------------------------------
def pack_tril(attention: np.ndarray) -> np.ndarray:
    """numpy view of ``pipeline.attention_maps.dense_to_tril``: [S, S] -> [S * (S + 1) / 2]."""
    return dense_to_tril(torch.from_numpy(np.ascontiguousarray(attention))).numpy()


def relative_frobenius(reference: np.ndarray, approx: np.ndarray) -> float:
    """||reference - approx||_F / ||reference||_F in float64 (0 if both are 0, inf if only ref)."""
    ref = np.asarray(reference, dtype=np.float64)
    diff = float(np.linalg.norm(ref - np.asarray(approx, dtype=np.float64)))
    norm = float(np.linalg.norm(ref))
    if norm == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / norm


def measure(codec: Codec, maps: Sequence[np.ndarray], *, causal: bool = True) -> dict:
    """Store `maps` as one shard array with `codec` in memory; report size, ratio, error, timings.

    maps: 2-D float32 arrays; causal=True packs each [S, S] map's lower triangle, causal=False
    stores [rows, cols] blocks (text-to-vision) whole. One block per map, so `quant` bounds each.
    bytes_stored counts chunk bytes only (zarr.json metadata is per shard, not per sample);
    bytes_raw_fp16_full = 2 * sum(rows * cols) of the full maps; ratio_vs_raw_fp16_triangle: against
    2 * S * (S + 1) / 2 bytes per causal map (= the full-map ratio for blocks); rel_error = the worst
    map's relative Frobenius error over its full map.
    """
    blocks = [pack_tril(m) if causal else np.asarray(m).ravel() for m in maps]
    lengths = [np.arange(1, m.shape[0] + 1) if causal else np.full(m.shape[0], m.shape[1])
               for m in maps]
    row_lengths = np.concatenate(lengths)
    values = np.concatenate(blocks).astype(np.float32)
    chunks: dict = {}
    group = zarr.open_group(zarr.storage.MemoryStore(chunks), mode="w", zarr_format=3)
    t0 = time.perf_counter()
    codec.write(group, "x", values, row_lengths=row_lengths, block_rows=[m.shape[0] for m in maps])
    t1 = time.perf_counter()
    decoded = codec.read(group, "x", start=0, stop=values.size, row_lengths=row_lengths)
    t2 = time.perf_counter()
    stored = sum(len(buf) for key, buf in chunks.items() if not key.endswith("zarr.json"))
    raw = 2 * sum(m.size for m in maps)
    offsets = np.cumsum([0] + [b.size for b in blocks])
    errors = [relative_frobenius(block, decoded[offsets[i]:offsets[i + 1]])
              for i, block in enumerate(blocks)]
    triangle = sum(m.shape[0] * (m.shape[0] + 1) for m in maps) if causal else raw
    return {"bytes_stored": stored, "bytes_raw_fp16_full": raw, "ratio_vs_raw_fp16_full": raw / max(stored, 1),
            "ratio_vs_raw_fp16_triangle": triangle / max(stored, 1),
            "rel_error": max(errors, default=0.0), "encode_s": t1 - t0, "decode_s": t2 - t1}


# --------------------------------------------------------------------------------------------------
# synthetic calibration input
# --------------------------------------------------------------------------------------------------
def _smooth(noise: np.ndarray, width: float) -> np.ndarray:
    kernel = np.exp(-0.5 * (np.arange(-3 * width, 3 * width + 1) / width) ** 2)
    offset = (kernel.size - 1) // 2
    return np.convolve(noise, kernel / kernel.sum())[offset:offset + noise.size]


def synthetic_causal_attention(size: int, n_vision_spans: int, seed: int, *, n_heads: int = 8,
                               span_len: int = 256, logit_noise: float = 1.0):
    """SYNTHETIC calibration input, not teacher output: a head-mean causal softmax map.

    Layout: a text prefix, n_vision_spans image spans (span_len tokens, a square grid, framed by
    text tokens), then question/answer text. Each head's logits = attention sink on position 0
    (bonus ~U(0, 9), so some heads are sink-dominated and some content heads) + per-key salience
    (i.i.d. for text, spatially smooth for image tokens) + recency decay + diagonal bonus + a smooth
    low-rank query-key term + 2-D locality inside an image + i.i.d. logit noise (std logit_noise),
    masked causally; softmax per row in float32 and mean over heads.
    Returns (attention [S, S] float32, rows sum to 1, zero above the diagonal; is_vision [S] bool).
    """
    rng = np.random.default_rng(seed)
    prefix = min(24, size // 8)
    span_len = min(span_len, (size - prefix - size // 8) // max(n_vision_spans, 1) - 4)
    if n_vision_spans and span_len < 1:
        raise ValueError(f"size {size} is too small for {n_vision_spans} image spans")
    image = np.full(size, -1)
    for k in range(n_vision_spans):
        first = prefix + 1 + k * (span_len + 4)
        image[first:first + span_len] = k
    is_vision = image >= 0
    grid = np.zeros(size, dtype=np.int64)
    grid[is_vision] = np.tile(np.arange(span_len), n_vision_spans)
    side = max(1, int(np.sqrt(span_len)))
    row, col = grid // side, grid % side
    same_image = (image[:, None] == image[None, :]) & is_vision[:, None]
    near = (np.abs(row[:, None] - row[None, :]) <= 1) & (np.abs(col[:, None] - col[None, :]) <= 1)
    local = same_image & near
    distance = np.maximum(np.arange(size)[:, None] - np.arange(size)[None, :], 0).astype(np.float32)
    causal = np.tri(size, dtype=bool)
    attention = np.zeros((size, size), dtype=np.float32)
    for _ in range(n_heads):
        salience = np.where(is_vision, 2.8 * _smooth(rng.normal(size=size), 6) - 1.0
                            + rng.normal(0, 0.3, size), rng.normal(size=size))
        query = np.stack([4 * _smooth(rng.normal(size=size), 20) for _ in range(4)], axis=1)
        key = np.stack([2 * _smooth(rng.normal(size=size), 4) for _ in range(4)], axis=1)
        logits = (salience[None, :] + rng.uniform(1, 5) * np.exp(-distance / rng.uniform(2, 20))
                  + 0.5 * query @ key.T + 1.5 * local).astype(np.float32)
        logits += rng.normal(0, logit_noise, (size, size)).astype(np.float32)
        logits[:, 0] += rng.uniform(0, 9)
        logits[np.diag_indices(size)] += rng.uniform(0, 3)
        logits = np.where(causal, logits, -np.inf)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        attention += probs / probs.sum(axis=1, keepdims=True)
    return attention / n_heads, is_vision
