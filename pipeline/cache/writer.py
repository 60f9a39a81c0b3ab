"""Cache storage: the shard writer (Zarr v3 group + Parquet index + commit marker) and shard listing.

Paths may be local or fsspec URLs (s3://, gs://, ...). A shard is written by exactly one worker and
committed by its marker, written last; a shard with data but no marker is partial and is removed
before it is written again (DESIGN contract 3).
"""

from __future__ import annotations

import io
import posixpath

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from pipeline.cache.codecs import Codec
from pipeline.cache.format import chunk_counts, index_digest, part_name, row_lengths_for, write_marker, zarr_store
from schemas.cache import CommitMarker, shard_files
from schemas.method import SIGNALS

FLUSH_BYTES = 512 << 20  # buffered float32 bytes before the writer appends to the Zarr arrays


def block_rows_for(signal: str, shape: tuple[int, ...]) -> np.ndarray:
    """Rows of each codec block of a sample: one block per map (a lossy codec bounds its error per
    block), so n_maps blocks of S rows for ``mid`` and one block of n_text rows for a tv block."""
    if signal == "mid":
        n_maps, packed = shape
        return np.full(n_maps, len(row_lengths_for(signal, shape)) // n_maps, dtype=np.int64)
    return np.array([shape[0]], dtype=np.int64)


class CacheShardWriter:
    """Writes one cache shard; use as a context manager, ``add`` each sample, ``commit`` at the end.

    Blocks are buffered and appended to the shard's flat per-signal arrays once ``flush_bytes`` is
    reached, so a shard of any size streams through bounded memory. Leaving the context without
    ``commit`` (an error, a kill) leaves the shard uncommitted.
    """

    def __init__(self, *, root: str, index: int, codec: Codec, signals: list[str],
                 flush_bytes: int = FLUSH_BYTES):
        unknown = sorted(set(signals) - set(SIGNALS))
        if unknown:
            raise ValueError(f"unknown signals {unknown}; known: {list(SIGNALS)}")
        self.root, self.index, self.codec, self.signals = root, index, codec, list(signals)
        self.flush_bytes = flush_bytes
        self.fs, self.path = fsspec.core.url_to_fs(root)
        self.files = {k: posixpath.join(self.path, v) for k, v in shard_files(index).items()}
        self.rows: list[dict] = []
        self.buffers: dict[str, list[np.ndarray]] = {s: [] for s in self.signals}
        self.buffered = 0
        self.part = 0
        self.cursor = {s: {"offset": 0, "row_offset": 0} for s in self.signals}
        self.totals = {s: 0 for s in self.signals}
        self.group = None

    def __enter__(self) -> CacheShardWriter:
        for part in ("marker", "index", "group"):  # a partial shard is rewritten from scratch, marker first
            if self.fs.exists(self.files[part]):
                self.fs.rm(self.files[part], recursive=True)
        self.fs.makedirs(posixpath.join(self.path, "shards"), exist_ok=True)
        store = zarr_store(self.root, shard_files(self.index)["group"], read_only=False)
        self.group = zarr.open_group(store=store, mode="w", zarr_format=3)
        return self

    def __exit__(self, *exc) -> None:
        self.buffers = {s: [] for s in self.signals}

    def add(self, row: dict, blocks: dict[str, np.ndarray]) -> None:
        """Buffer one sample: ``row`` holds the index fields, ``blocks`` one float32 array per signal."""
        missing = sorted(set(self.signals) - set(blocks))
        if missing:
            raise ValueError(f"sample {row.get('key')}: missing blocks for signals {missing}")
        row = dict(row)
        for signal in self.signals:
            block = np.ascontiguousarray(blocks[signal], dtype=np.float32)
            cur = self.cursor[signal]
            rows = len(row_lengths_for(signal, block.shape))
            row.update({f"{signal}_part": self.part, f"{signal}_offset": cur["offset"], f"{signal}_count": block.size,
                        f"{signal}_row_offset": cur["row_offset"], f"{signal}_rows": rows,
                        f"{signal}_shape": list(block.shape)})
            cur["offset"] += block.size
            cur["row_offset"] += rows
            self.totals[signal] += block.size
            self.buffers[signal].append(block)
            self.buffered += block.nbytes
        self.rows.append(row)
        if self.buffered >= self.flush_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the buffered blocks as the next part of each signal's arrays."""
        if not self.rows or not any(self.buffers.values()):
            return
        for signal, blocks in self.buffers.items():
            values = np.concatenate([b.reshape(-1) for b in blocks])
            lengths = np.concatenate([row_lengths_for(signal, b.shape) for b in blocks])
            block_rows = np.concatenate([block_rows_for(signal, b.shape) for b in blocks])
            node = self.group.require_group(signal)
            self.codec.write(node, part_name(self.part), values, row_lengths=lengths, block_rows=block_rows)
            self.buffers[signal] = []
        self.buffered = 0
        self.part += 1
        self.cursor = {s: {"offset": 0, "row_offset": 0} for s in self.signals}

    def commit(self) -> dict:
        """Flush, write the Parquet index, then the marker (chunk counts, index digest). Returns the
        shard's metadata (the marker's fields)."""
        self.flush()
        columns = {name: [r[name] for r in self.rows] for name in self.rows[0]} if self.rows else {"key": []}
        buffer = io.BytesIO()
        pq.write_table(pa.table(columns), buffer)
        with self.fs.open(self.files["index"], "wb") as handle:
            handle.write(buffer.getvalue())
        marker = CommitMarker(shard=self.index, samples=len(self.rows), parts=self.part, elements=dict(self.totals),
                              arrays=chunk_counts(self.group), index_sha256=index_digest(buffer.getvalue()))
        write_marker(self.root, marker)
        return marker.to_json()
