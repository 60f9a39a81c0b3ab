"""What the cache codecs share: the codec format version, Zarr array creation (crc32c on every chunk)
and the checks of values, row structure and element ranges (``codecs.py``, ``codec2.py``)."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

CODEC_FORMAT_VERSION = 2
"""The newest codec format this code writes and reads: 2 added ``quant2``. Each description records the
version that defined its codec's layout; descriptions and arrays of version 1 (lossless, quant, log8) read."""
READABLE_CODEC_VERSIONS = (1, 2)
CHUNK_BYTES = 2 << 20  # raw bytes per chunk: random access to one sample's block reads a few chunks


# --------------------------------------------------------------------------------------------------
# shared helpers: argument checks and zarr array creation
# --------------------------------------------------------------------------------------------------
class NodeParts:
    """``open_part`` of the version-1 codecs: a reader opens each stored array once per part and passes it
    to ``read(..., part=...)`` for every sample in it (quant2's ``open_part`` also reads its block offsets)."""

    def open_part(self, group: zarr.Group, name: str):
        return group[name]


def _blosc(clevel: int) -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=clevel, shuffle="shuffle")


def create_array(group: zarr.Group, path: str, data: np.ndarray, clevel: int | None, attrs=None) -> None:
    """Every chunk is written (zeros too, so the commit marker's chunk count is exact) and ends with a
    crc32c checksum that Zarr checks on every read. clevel None: no blosc (data already entropy-coded)."""
    chunk = max(1, min(len(data), CHUNK_BYTES // data.dtype.itemsize))
    compressors = [Crc32cCodec()] if clevel is None else [_blosc(clevel), Crc32cCodec()]
    group.create_array(path, data=data, chunks=(chunk,), filters=None, compressors=compressors,
                       attributes=attrs, config={"write_empty_chunks": True})


def as_values(values: np.ndarray, *, non_negative: bool) -> np.ndarray:
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 1:
        raise ValueError(f"values must be a flat 1-D array, got shape {values.shape}; "
                         "flatten each block (row-major) and concatenate")
    if values.size and not np.isfinite(values).all():
        raise ValueError("values contain NaN or inf; attention probabilities must be finite")
    if non_negative and values.size and values.min() < 0:
        raise ValueError(f"values must be >= 0 for this codec (attention probabilities), found "
                         f"minimum {values.min()}; use the 'lossless' codec for signed data")
    return values


def as_rows(n_values: int, row_lengths, block_rows, *, required: bool):
    """Validate the row structure; returns (row_lengths int64, block_rows int64) or (None, None)."""
    if row_lengths is None:
        if required:
            raise ValueError("this codec keeps per-row parameters: pass row_lengths (elements "
                             "per row: n_vision per text row, i + 1 for row i of a triangle)")
        if block_rows is not None:
            raise ValueError("block_rows needs row_lengths")
        return None, None
    lengths = np.asarray(row_lengths, dtype=np.int64)
    if lengths.ndim != 1 or (lengths.size and lengths.min() < 0) or lengths.sum() != n_values:
        raise ValueError(f"row_lengths must be non-negative and sum to the number of values "
                         f"({n_values}); got {lengths.size} rows summing to {lengths.sum()}")
    blocks = np.asarray([lengths.size] if block_rows is None else block_rows, dtype=np.int64)
    if blocks.ndim != 1 or (blocks.size and blocks.min() < 0) or blocks.sum() != lengths.size:
        raise ValueError(f"block_rows must be non-negative and sum to the number of rows "
                         f"({lengths.size}); got {blocks.size} blocks summing to {blocks.sum()}")
    return lengths, blocks


def check_range(node, expected: dict, length: int, start: int, stop: int) -> None:
    stored = dict(node.attrs.get("codec") or {})
    if stored.get("version") in READABLE_CODEC_VERSIONS:  # version 1 arrays read with the same codec
        stored["version"] = expected.get("version")
    if stored != expected:
        raise ValueError(f"array '{node.path}' was written with codec {stored}, but is being read "
                         f"with {expected}; build the codec from the cache manifest "
                         "(codec_from_description)")
    if not 0 <= start <= stop <= length:
        raise ValueError(f"element range [{start}, {stop}) is outside the stored array of "
                         f"length {length} at '{node.path}'")


def row_range(n_elements: int, row_start: int, row_lengths, n_rows: int) -> np.ndarray:
    if row_lengths is None:
        raise ValueError("this codec keeps per-row parameters: pass row_start and the row_lengths "
                         "of the rows covering [start, stop) (from the sample's index entry)")
    lengths = np.asarray(row_lengths, dtype=np.int64)
    if lengths.sum() != n_elements:
        raise ValueError(f"row_lengths sum to {lengths.sum()} but [start, stop) holds {n_elements} "
                         f"elements; pass the rows of exactly that range")
    if not 0 <= row_start <= row_start + lengths.size <= n_rows:
        raise ValueError(f"rows [{row_start}, {row_start + lengths.size}) are outside the "
                         f"{n_rows} stored rows")
    return lengths


def describe_codec(codec) -> dict:
    """Name, parameters and the codec format version that defined the codec's layout (``since``: 1 for
    lossless / quant / log8, whose caches stay resumable and readable by version-1 readers; 2 for quant2).
    Parameters left unset (None) are left out, so that adding an optional parameter keeps the descriptions
    of caches written before it (a read compares descriptions exactly)."""
    params = {key: value for key, value in asdict(codec).items() if value is not None}
    return {"name": codec.name, "version": codec.since, "lossless": codec.lossless, "params": params}


def check_clevel(clevel: int) -> None:
    if not (isinstance(clevel, int) and 1 <= clevel <= 9):
        raise ValueError(f"clevel must be an integer in 1..9 (zstd level inside blosc), "
                         f"got {clevel!r}")
