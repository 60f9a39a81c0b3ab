"""The cache's storage layout in one home: paths, Zarr stores, commit markers and shard verification.

Contract in ``schemas/cache.py``. Used by the writer (markers), the reader (verification on open)
and ``cache_teacher.verify`` / ``--repair`` (every bad shard and signal named).
A committed shard of format version 2 carries a marker listing every Zarr array's chunk count and
the sha256 of its Parquet index; its chunks end with a crc32c checksum (Zarr v3 codec), so a
deleted, truncated or garbled file is found: counts and digest on open, checksums on read.
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath

import fsspec
import numpy as np
import zarr

from schemas.cache import MARKER_GLOB, CommitMarker, marker_shard, shard_files

FIX = "Check it with `python -m cache_teacher.verify {root} --deep`; re-cache it with the cache job's --repair."


class CacheIntegrityError(ValueError):
    """A committed cache shard that is damaged; the message names cache, shard, signal (and sample)."""


def part_name(part: int) -> str:
    return f"part-{part:04d}"


def row_lengths_for(signal: str, shape) -> np.ndarray:
    """Stored elements of each row of a sample's block: tv blocks [n_text, n_vision] have rows of
    n_vision; ``mid`` [n_maps, S*(S+1)/2] holds n_maps packed triangles with rows of 1..S."""
    if signal == "mid":
        n_maps, packed = shape
        size = (math.isqrt(8 * packed + 1) - 1) // 2
        return np.tile(np.arange(1, size + 1, dtype=np.int64), n_maps)
    return np.full(shape[0], shape[1], dtype=np.int64)


def block_rows_for(signal: str, shape: tuple[int, ...]) -> np.ndarray:
    """Rows of each codec block of a sample: one block per map (a lossy codec bounds its error per
    block), so n_maps blocks of S rows for ``mid`` and one block of n_text rows for a tv block."""
    if signal == "mid":
        n_maps, packed = shape
        return np.full(n_maps, len(row_lengths_for(signal, shape)) // n_maps, dtype=np.int64)
    return np.array([shape[0]], dtype=np.int64)


def zarr_store(root: str, relative: str, *, read_only: bool):
    """Store of the Zarr group at ``root/relative``: a local path, or an fsspec URL (s3://, gs://, ...)."""
    if "://" not in root or root.startswith("file://"):
        local = root.removeprefix("file://")
        return posixpath.join(local, relative)
    return zarr.storage.FsspecStore.from_url(f"{root.rstrip('/')}/{relative}", read_only=read_only)


def open_shard_group(root: str, shard: int) -> zarr.Group:
    return zarr.open_group(store=zarr_store(root, shard_files(shard)["group"], read_only=True), mode="r")


def committed_shards(root: str) -> set[int]:
    """Indices of the shards whose commit marker exists."""
    fs, path = fsspec.core.url_to_fs(root)
    return {marker_shard(p) for p in fs.glob(posixpath.join(path, MARKER_GLOB))}


def chunk_counts(group: zarr.Group) -> dict[str, int]:
    """Stored chunk count of every array of a shard group, keyed by its path in the group."""
    return {name: node.nchunks_initialized for name, node in group.members(max_depth=None)
            if isinstance(node, zarr.Array)}


def index_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_marker(root: str, marker: CommitMarker) -> None:
    fs, path = fsspec.core.url_to_fs(root)
    with fs.open(posixpath.join(path, shard_files(marker.shard)["marker"]), "w") as handle:
        handle.write(json.dumps(marker.to_json()))


def read_marker(root: str, shard: int) -> CommitMarker:
    fs, path = fsspec.core.url_to_fs(root)
    where = posixpath.join(path, shard_files(shard)["marker"])
    try:
        return CommitMarker.from_json(json.loads(fs.cat_file(where)), source=where)
    except json.JSONDecodeError as err:
        raise CacheIntegrityError(f"cache {root}, shard {shard}: commit marker {where} is not JSON ({err}). "
                                  + FIX.format(root=root)) from err


def read_index_bytes(root: str, shard: int, marker: CommitMarker) -> bytes:
    """The Parquet index of a committed shard, checked against the marker's digest (version 2)."""
    fs, path = fsspec.core.url_to_fs(root)
    where = posixpath.join(path, shard_files(shard)["index"])
    try:
        data = fs.cat_file(where)
    except FileNotFoundError as err:
        raise CacheIntegrityError(f"cache {root}, shard {shard}: its index {where} is missing although the shard "
                                  "is committed. " + FIX.format(root=root)) from err
    if marker.index_sha256 is not None and index_digest(data) != marker.index_sha256:
        raise CacheIntegrityError(f"cache {root}, shard {shard}: index {where} does not match the digest in its "
                                  "commit marker (changed or truncated). " + FIX.format(root=root))
    return data


def shard_problems(root: str, shard: int, *, deep: bool = False) -> list[str]:
    """What is wrong with committed shard ``shard`` (empty: sound). Counts chunks and checks the index
    digest; ``deep`` also decodes every chunk (checksums, compressed streams)."""
    try:
        marker = read_marker(root, shard)
        read_index_bytes(root, shard, marker)
    except (CacheIntegrityError, ValueError) as err:
        return [str(err)]
    try:
        group = open_shard_group(root, shard)
        counts = chunk_counts(group)
    except (FileNotFoundError, ValueError, KeyError) as err:
        return [f"cache {root}, shard {shard}: its Zarr group cannot be opened ({err}). " + FIX.format(root=root)]
    problems = []
    for name, expected in sorted((marker.arrays or {}).items()):
        found = counts.get(name, 0)
        if found != expected:
            problems.append(f"cache {root}, shard {shard}, signal {name.split('/')[0]}: array {name} holds "
                            f"{found} of its {expected} chunks. " + FIX.format(root=root))
    if deep:
        problems += [problem for name in sorted(counts) if (problem := _decode_problem(root, shard, name, group[name]))]
    return problems


def _decode_problem(root: str, shard: int, name: str, array: zarr.Array) -> str | None:
    """None if every chunk of the (1-D) array decodes, read one chunk at a time; else the finding."""
    step = array.chunks[0]
    try:
        for start in range(0, array.shape[0], step):
            array[start:start + step]
    except Exception as err:  # any decode failure (checksum, blosc, truncated file) is a finding
        return (f"cache {root}, shard {shard}, signal {name.split('/')[0]}: array {name} does not decode "
                f"({type(err).__name__}: {err}). " + FIX.format(root=root))
    return None
