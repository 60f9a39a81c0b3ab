"""Read a teacher cache (format in ``schemas/cache.py``): the notebook API and the trainer's source.

    cache = open_cache("caches/InternVL3-8B")
    sample = cache[cache.keys()[0]]
    sample.first_tv            # numpy [n_text, n_vision] float32
    sample.mid(0)              # dense [S, S] float32
    cache.plot(key, signal="first_tv", data="data/shards")

The trainer takes ``sample.target(signal)``: a float32 tensor, or with codec ``quant2`` a
``DeviceTarget`` whose ``.to(device)`` moves the codes (1-2 bytes per entry) and dequantises there.

Only committed shards are visible. Opening checks every committed shard (chunk counts and index
digest against its commit marker, ``pipeline/cache/format.py``); reads check chunk checksums (quant2
reads a stored part's block offsets once and keeps them for its other samples). Any damage raises
CacheIntegrityError naming the cache, shard, signal and sample. Zarr groups are opened lazily, so a
reader pickles cheaply into DataLoader workers.
"""

from __future__ import annotations

import io
import json
import posixpath
from dataclasses import dataclass, replace
from functools import cached_property

import fsspec
import numpy as np
import pyarrow.parquet as pq
import torch
import zarr

from pipeline.attention.maps import group_mean, tril_to_dense
from pipeline.cache.codec2 import CodeBlocks
from pipeline.cache.codecs import codec_from_description
from pipeline.cache.format import (
    FIX,
    CacheIntegrityError,
    committed_shards,
    open_shard_group,
    part_name,
    read_index_bytes,
    read_marker,
    row_lengths_for,
    shard_problems,
)
from schemas.cache import INDEX_COLUMNS, MANIFEST_NAME, SIGNAL_COLUMNS, CacheManifest


def open_cache(root: str) -> TeacherCache:
    """Open the cache at ``root`` (local path or fsspec URL) and check its committed shards."""
    return TeacherCache(str(root))


@dataclass
class DeviceTarget:
    """A stored block as codes; ``.to(device)`` dequantises it there (the trainer's target of quant2).

    shape: the stored shape; group: mean the leading (map) dimension down to this many groups after
    dequantising (``group_mean``: a reasoning target of a cache that is not pre-grouped), or None.
    Behaves like a CPU tensor for the DataLoader: ``pin_memory()`` and ``to(device, non_blocking)``.
    """

    blocks: CodeBlocks
    shape: tuple
    group: int | None = None

    def pin_memory(self) -> DeviceTarget:
        return replace(self, blocks=self.blocks.pin_memory())

    def to(self, device, non_blocking: bool = False) -> torch.Tensor:
        values = self.blocks.dequantise(device, non_blocking=non_blocking).reshape(self.shape)
        return values if self.group is None else group_mean(values, self.group)


@dataclass
class CachedSample:
    """One sample's cached maps; arrays are read on first access."""

    cache: TeacherCache
    row: dict

    @property
    def key(self) -> str:
        return self.row["key"]

    @property
    def capability(self) -> str:
        return self.row["capability"]

    @property
    def digest(self) -> str:
        return self.row["layout_digest"]

    @cached_property
    def layout(self) -> dict:
        """seq_len, n_text, n_vision, vision_spans, answer_span, tiling, digest, layout_version."""
        return json.loads(self.row["layout"])

    def block(self, signal: str) -> np.ndarray:
        """The stored block of ``signal`` (shape as written) as float32."""
        if f"{signal}_offset" not in self.row:
            raise KeyError(f"cache {self.cache.root} stores no {signal!r} signal; stored: "
                           f"{sorted(self.cache.manifest.signals)}")
        return self.cache.read_block(self.row, signal)

    def target(self, signal: str, *, group: int | None = None) -> torch.Tensor | DeviceTarget:
        """The block of ``signal`` for training: a float32 tensor, or (quant2) a DeviceTarget that
        dequantises on the device it is moved to. ``group``: the group means of its maps (mid)."""
        if f"{signal}_offset" not in self.row:
            raise KeyError(f"cache {self.cache.root} stores no {signal!r} signal; stored: "
                           f"{sorted(self.cache.manifest.signals)}")
        if hasattr(self.cache.codec, "read_codes"):
            return DeviceTarget(self.cache.read_block(self.row, signal, codes=True), tuple(self.row[f"{signal}_shape"]),
                                group)
        values = torch.from_numpy(self.cache.read_block(self.row, signal))
        return values if group is None else group_mean(values, group)

    @property
    def first_tv(self) -> np.ndarray:
        return self.block("first_tv")

    @property
    def penult_tv(self) -> np.ndarray:
        return self.block("penult_tv")

    def mid_packed(self) -> np.ndarray:
        """[n_maps, S*(S+1)/2]: one per teacher layer, or one per student layer when pre-grouped."""
        return self.block("mid")

    def mid(self, i: int) -> np.ndarray:
        """The i-th intermediate map as a dense [S, S] array (zeros above the diagonal)."""
        packed = self.mid_packed()
        if not -len(packed) <= i < len(packed):
            raise IndexError(f"mid map {i} out of range: sample {self.key} has {len(packed)} maps")
        return tril_to_dense(torch.from_numpy(packed[i]), self.layout["seq_len"]).numpy()


class TeacherCache:
    """Mapping of sample key -> CachedSample over the committed shards of one cache."""

    def __init__(self, root: str):
        self.root = root
        self.fs, self.path = fsspec.core.url_to_fs(root)
        manifest_path = posixpath.join(self.path, MANIFEST_NAME)
        if not self.fs.exists(manifest_path):
            raise FileNotFoundError(f"{root}: no {MANIFEST_NAME}; not a teacher cache (create one with "
                                    "`python -m cache_teacher --teacher ... --data ... --out {root}`)")
        self.manifest = CacheManifest.from_json(json.loads(self.fs.cat_file(manifest_path)), source=manifest_path)
        self.codec = codec_from_description(self.manifest.codec)
        self._groups: dict[int, zarr.Group] = {}
        self._parts: dict[tuple, object] = {}  # (shard, signal, part) -> the codec's opened part
        self.index = self._read_index()  # verified here, in the opening process, not in DataLoader workers

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_groups"], state["_parts"] = {}, {}
        return state

    def _read_index(self) -> dict[str, dict]:
        """key -> index row, over committed shards only; CacheIntegrityError lists every damaged shard."""
        rows, problems = {}, []
        for shard in sorted(committed_shards(self.root)):
            found = shard_problems(self.root, shard)
            if found:
                problems += found
                continue
            for row in self._index_table(shard).to_pylist():
                rows[row["key"]] = row
        if problems:
            raise CacheIntegrityError("damaged committed shard(s):\n  - " + "\n  - ".join(problems))
        return rows

    def _index_table(self, shard: int):
        table = pq.read_table(io.BytesIO(read_index_bytes(self.root, shard, read_marker(self.root, shard))))
        required = set(INDEX_COLUMNS) | {f"{signal}_{suffix}" for signal in self.manifest.signals
                                         for suffix in SIGNAL_COLUMNS}
        missing = sorted(required - set(table.column_names))
        if table.num_rows and missing:
            raise ValueError(f"cache {self.root}, shard {shard}: index columns {missing} are missing; the shard was "
                             "not written by this cache format. Re-create the cache (python -m cache_teacher ... "
                             "--overwrite).")
        return table

    def keys(self) -> list[str]:
        return list(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def __getitem__(self, key: str) -> CachedSample:
        if key not in self.index:
            raise KeyError(f"sample {key!r} is not in cache {self.root} ({len(self.index)} committed samples); "
                           "was the cache made from the same data shards, and did every shard commit?")
        return CachedSample(self, self.index[key])

    def _group(self, shard: int) -> zarr.Group:
        if shard not in self._groups:
            self._groups[shard] = open_shard_group(self.root, shard)
        return self._groups[shard]

    def _part(self, shard: int, signal: str, name: str):
        if (shard, signal, name) not in self._parts:
            self._parts[shard, signal, name] = self.codec.open_part(self._group(shard)[signal], name)
        return self._parts[shard, signal, name]

    def read_block(self, row: dict, signal: str, *, codes: bool = False):
        """One sample's block of ``signal`` (float32 numpy, or with ``codes`` the codec's CodeBlocks);
        CacheIntegrityError (cache, shard, signal, key) if it does not decode."""
        shape = tuple(row[f"{signal}_shape"])
        start = row[f"{signal}_offset"]
        try:
            name = part_name(row[f"{signal}_part"])
            read = self.codec.read_codes if codes else self.codec.read
            span = {"start": start, "stop": start + row[f"{signal}_count"], "row_start": row[f"{signal}_row_offset"],
                    "row_lengths": row_lengths_for(signal, shape)}
            values = read(None, name, part=self._part(row["shard"], signal, name), **span)  # opened once per part
        except Exception as err:  # checksum, blosc, missing file: all mean a damaged shard
            raise CacheIntegrityError(f"cache {self.root}, shard {row['shard']}, signal {signal}, sample "
                                      f"{row['key']}: the stored block does not decode ({type(err).__name__}: "
                                      f"{err}). " + FIX.format(root=self.root)) from err
        return values if codes else values.reshape(shape)

    def plot(self, key: str, *, signal: str = "first_tv", data: str | None = None, query: str = "answer"):
        """Text-to-vision attention of one sample drawn as heat maps over its camera views.

        signal: first_tv or penult_tv. query: "answer" averages the rows of the answer tokens,
        "all" averages every text row. data: the shards directory (default: the one recorded in the
        manifest) from which the camera images are read. Returns a matplotlib Figure.
        """
        from pipeline.cache.plot import plot_tv_overlay

        return plot_tv_overlay(self[key], signal=signal, data=data or self.manifest.dataset["shards_dir"],
                               query=query)
