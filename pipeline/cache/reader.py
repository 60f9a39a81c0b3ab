"""Read a teacher cache (format in ``schemas/cache.py``): the notebook API and the trainer's source.

    cache = open_cache("caches/InternVL3-8B")
    sample = cache[cache.keys()[0]]
    sample.first_tv            # numpy [n_text, n_vision] float32
    sample.mid(0)              # dense [S, S] float32
    cache.plot(key, signal="first_tv", data="data/shards")

Only committed shards are visible. Zarr groups are opened lazily, so a reader pickles cheaply into
DataLoader workers.
"""

from __future__ import annotations

import json
import math
import posixpath
from dataclasses import dataclass
from functools import cached_property

import fsspec
import numpy as np
import pyarrow.parquet as pq
import torch
import zarr

from pipeline.attention.maps import tril_to_dense
from pipeline.cache.codecs import codec_from_description
from schemas.cache import INDEX_COLUMNS, MANIFEST_NAME, SIGNAL_COLUMNS, CacheManifest, shard_files


def row_lengths_for(signal: str, shape) -> np.ndarray:
    """Stored elements of each row of a sample's block: tv blocks [n_text, n_vision] have rows of
    n_vision; ``mid`` [n_maps, S*(S+1)/2] holds n_maps packed triangles with rows of 1..S."""
    if signal == "mid":
        n_maps, packed = shape
        size = (math.isqrt(8 * packed + 1) - 1) // 2
        return np.tile(np.arange(1, size + 1, dtype=np.int64), n_maps)
    return np.full(shape[0], shape[1], dtype=np.int64)


def zarr_store(root: str, relative: str, *, read_only: bool):
    """Store of the Zarr group at ``root/relative``: a local path, or an fsspec URL (s3://, gs://, ...)."""
    if "://" not in root or root.startswith("file://"):
        local = root.removeprefix("file://")
        return posixpath.join(local, relative)
    return zarr.storage.FsspecStore.from_url(f"{root.rstrip('/')}/{relative}", read_only=read_only)


def part_name(part: int) -> str:
    return f"part-{part:04d}"


def open_cache(root: str) -> TeacherCache:
    """Open the cache at ``root`` (local path or fsspec URL)."""
    return TeacherCache(str(root))


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

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_groups"] = {}
        state.pop("index", None)
        return state

    @cached_property
    def index(self) -> dict[str, dict]:
        """key -> index row, over committed shards only."""
        rows = {}
        markers = self.fs.glob(posixpath.join(self.path, "shards", "shard-*.done"))
        for marker in sorted(markers):
            shard = int(posixpath.basename(marker)[len("shard-"):-len(".done")])
            index_path = posixpath.join(self.path, shard_files(shard)["index"])
            table = pq.read_table(index_path, filesystem=self.fs)
            required = set(INDEX_COLUMNS) | {f"{signal}_{suffix}" for signal in self.manifest.signals
                                             for suffix in SIGNAL_COLUMNS}
            missing = sorted(required - set(table.column_names))
            if table.num_rows and missing:
                raise ValueError(f"{index_path}: index columns {missing} are missing; the shard was not written by "
                                 "this cache format. Re-create the cache (python -m cache_teacher ... --overwrite).")
            for row in table.to_pylist():
                rows[row["key"]] = row
        return rows

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
            store = zarr_store(self.root, shard_files(shard)["group"], read_only=True)
            self._groups[shard] = zarr.open_group(store=store, mode="r")
        return self._groups[shard]

    def read_block(self, row: dict, signal: str) -> np.ndarray:
        shape = tuple(row[f"{signal}_shape"])
        start = row[f"{signal}_offset"]
        node = self._group(row["shard"])[signal]
        values = self.codec.read(node, part_name(row[f"{signal}_part"]), start=start,
                                 stop=start + row[f"{signal}_count"], row_start=row[f"{signal}_row_offset"],
                                 row_lengths=row_lengths_for(signal, shape))
        return values.reshape(shape)

    def plot(self, key: str, *, signal: str = "first_tv", data: str | None = None, query: str = "answer"):
        """Text-to-vision attention of one sample drawn as heat maps over its camera views.

        signal: first_tv or penult_tv. query: "answer" averages the rows of the answer tokens,
        "all" averages every text row. data: the shards directory (default: the one recorded in the
        manifest) from which the camera images are read. Returns a matplotlib Figure.
        """
        from pipeline.cache.plot import plot_tv_overlay

        return plot_tv_overlay(self[key], signal=signal, data=data or self.manifest.dataset["shards_dir"],
                               query=query)
