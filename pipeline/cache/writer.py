"""Cache storage: the shard writer (Zarr v3 group + Parquet index + commit marker) and shard listing.

Paths may be local or fsspec URLs (s3://, gs://, ...). A shard is written by exactly one worker and
committed by its marker, written last; a shard with data but no marker is partial and is removed
before it is written again (DESIGN contract 3).

With codec ``quant2`` each sample's maps arrive quantised (``Quantised``, codes made on the teacher's
device) or as floats (quantised here), and their entropy stage runs at once in a thread pool, one task
per map, while the teacher computes the next sample; the blobs are written at flush.
"""

from __future__ import annotations

import io
import os
import posixpath
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from pipeline.cache.codec2 import ContextQuantCodec, Quantised
from pipeline.cache.codecs import Codec
from pipeline.cache.format import (
    block_rows_for,
    chunk_counts,
    index_digest,
    part_name,
    row_lengths_for,
    write_marker,
    zarr_store,
)
from schemas.cache import CommitMarker, shard_files
from schemas.method import SIGNALS

FLUSH_BYTES = 512 << 20  # buffered float32 bytes before the writer appends to the Zarr arrays


def encode_threads() -> int:
    """Entropy-stage threads of a writer: the CPUs this process may use, at most 8."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


class CacheShardWriter:
    """Writes one cache shard; use as a context manager, ``add`` each sample, ``commit`` at the end.

    Blocks are buffered and appended to the shard's flat per-signal arrays once ``flush_bytes`` is
    reached (float32 bytes; codes bytes with ``quant2``), so a shard of any size streams through
    bounded memory. ``threads``: entropy-stage threads with ``quant2`` (default ``encode_threads()``). Leaving the context without
    ``commit`` (an error, a kill) leaves the shard uncommitted.
    """

    def __init__(self, *, root: str, index: int, codec: Codec, signals: list[str],
                 flush_bytes: int = FLUSH_BYTES, threads: int | None = None):
        unknown = sorted(set(signals) - set(SIGNALS))
        if unknown:
            raise ValueError(f"unknown signals {unknown}; known: {list(SIGNALS)}")
        if threads is not None and not (isinstance(threads, int) and threads >= 1):
            raise ValueError(f"threads must be a positive integer (entropy-stage threads), got {threads!r}")
        self.root, self.index, self.codec, self.signals = root, index, codec, list(signals)
        self.flush_bytes = flush_bytes
        self.threads = threads or encode_threads()
        self.pool: ThreadPoolExecutor | None = None
        self.pending: deque[Future] = deque()
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
        if isinstance(self.codec, ContextQuantCodec):
            self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix=f"encode-shard{self.index}")
        return self

    def __exit__(self, *exc) -> None:
        self.buffers = {s: [] for s in self.signals}
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def _entropy_stage(self, signal: str, block) -> tuple[Quantised, list[Future]]:
        """Quantise a float block (CPU) unless it came quantised, and queue one encode task per map."""
        if not isinstance(block, Quantised):
            block = self.codec.quantise_signal(signal, np.ascontiguousarray(block, dtype=np.float32))
        futures = [self.pool.submit(self.codec.encode, block, b) for b in range(block.block_rows.size)]
        self.pending.extend(futures)
        while len(self.pending) > 4 * self.threads:  # back-pressure: bounded codes in flight
            self.pending.popleft().result()
        return block, futures

    def add(self, row: dict, blocks: dict[str, np.ndarray]) -> None:
        """Buffer one sample: ``row`` holds the index fields, ``blocks`` one float32 array per signal."""
        missing = sorted(set(self.signals) - set(blocks))
        if missing:
            raise ValueError(f"sample {row.get('key')}: missing blocks for signals {missing}")
        row = dict(row)
        for signal in self.signals:
            block = blocks[signal]
            if self.pool is not None:
                block = self._entropy_stage(signal, block)
                shape, size, nbytes = block[0].shape, block[0].size, block[0].codes.nbytes
            else:
                block = np.ascontiguousarray(block, dtype=np.float32)
                shape, size, nbytes = block.shape, block.size, block.nbytes
            cur = self.cursor[signal]
            rows = len(row_lengths_for(signal, shape))
            row.update({f"{signal}_part": self.part, f"{signal}_offset": cur["offset"], f"{signal}_count": size,
                        f"{signal}_row_offset": cur["row_offset"], f"{signal}_rows": rows,
                        f"{signal}_shape": list(shape)})
            cur["offset"] += size
            cur["row_offset"] += rows
            self.totals[signal] += size
            self.buffers[signal].append(block)
            self.buffered += nbytes
        self.rows.append(row)
        if self.buffered >= self.flush_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the buffered blocks as the next part of each signal's arrays."""
        if not self.rows or not any(self.buffers.values()):
            return
        for signal, blocks in self.buffers.items():
            node = self.group.require_group(signal)
            if self.pool is not None:
                blobs = [future.result() for _, futures in blocks for future in futures]
                self.codec.write_blobs(node, part_name(self.part), blobs,
                                       np.concatenate([q.row_lengths for q, _ in blocks]),
                                       np.concatenate([q.block_rows for q, _ in blocks]))
            else:
                values = np.concatenate([b.reshape(-1) for b in blocks])
                lengths = np.concatenate([row_lengths_for(signal, b.shape) for b in blocks])
                block_rows = np.concatenate([block_rows_for(signal, b.shape) for b in blocks])
                self.codec.write(node, part_name(self.part), values, row_lengths=lengths, block_rows=block_rows)
            self.buffers[signal] = []
        self.pending.clear()
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
