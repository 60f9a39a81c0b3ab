"""The teacher-cache contract: manifest (``cache.json``), shard layout and index columns.

A cache directory holds::

    cache.json                      manifest (this module), written when the job starts
    shards/shard-000000.zarr/       one Zarr v3 group per data shard: per signal, flat 1-D arrays
                                    ("parts", one per writer flush: <signal>/part-0000, ...)
    shards/shard-000000.parquet     index: one row per sample (key, offsets and shapes per signal, ...)
    shards/shard-000000.done        commit marker (CommitMarker), written last; readers ignore shards
                                    without it

Version 2 adds integrity: every chunk ends with a crc32c checksum (Zarr v3 codec), and the marker
lists every array's chunk count and the sha256 of the Parquet index. Version 1 caches still read
(without those checks).

Signals (METHOD section 3): ``first_tv`` (layer 0, text-to-vision block [n_text, n_vision]),
``penult_tv`` (layer L-2, same block), ``mid`` (intermediate maps, each stored as the packed lower
triangle of an S x S map: [n_maps, S*(S+1)/2]).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath

from schemas.method import SIGNALS

CACHE_FORMAT = "drive-kd/teacher-cache"
CACHE_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST_NAME = "cache.json"

# Index columns per sample; each signal adds f"{signal}_{suffix}" for these suffixes.
INDEX_COLUMNS = ("key", "shard", "capability", "seq_len", "n_text", "n_vision", "layout_digest", "layout")
SIGNAL_COLUMNS = ("part", "offset", "count", "row_offset", "rows", "shape")


def shard_stem(index: int) -> str:
    return f"shard-{index:06d}"


def shard_files(index: int) -> dict[str, str]:
    """Relative paths of the group, index and marker of cache shard ``index``."""
    stem = str(PurePosixPath("shards") / shard_stem(index))
    return {"group": f"{stem}.zarr", "index": f"{stem}.parquet", "marker": f"{stem}.done"}


MARKER_GLOB = "shards/shard-*.done"


def marker_shard(path: str) -> int:
    """Shard index of a commit marker path (``.../shard-000012.done`` -> 12)."""
    name = PurePosixPath(path).name
    return int(name[len("shard-"):-len(".done")])


@dataclass(frozen=True)
class CommitMarker:
    """What a committed shard must hold (DESIGN contract 7).

    arrays: Zarr array path in the shard group -> stored chunk count; index_sha256: sha256 hex of
    the Parquet index file. Both None in markers of version-1 caches.
    """

    shard: int
    samples: int
    parts: int
    elements: dict
    arrays: dict | None = None
    index_sha256: str | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict, *, source: str) -> CommitMarker:
        missing = sorted({"shard", "samples", "parts", "elements"} - set(data))
        if missing:
            raise ValueError(f"{source}: commit marker lacks {missing}; the shard is damaged")
        return cls(**{k: data.get(k) for k in ("shard", "samples", "parts", "elements", "arrays", "index_sha256")})


@dataclass(frozen=True)
class SignalSpec:
    """Which teacher layers a stored signal comes from.

    layers: teacher decoder layer indices (resolved, non-negative).
    role: the loss it serves (perception / planning / reasoning).
    groups: for a pre-grouped ``mid``: per student layer, the teacher layers averaged (else None).
    """

    layers: list[int]
    role: str
    groups: list[list[int]] | None = None


@dataclass
class CacheManifest:
    """Self-description of a teacher cache (DESIGN contract 4)."""

    teacher: dict
    """name, path, family, config_digest, num_layers, num_heads."""
    signals: dict[str, SignalSpec]
    """signal name -> SignalSpec; only the signals stored."""
    codec: dict
    """codec name and parameters (pipeline.cache_codecs describe())."""
    dtype: str
    """dtype the teacher ran in (maps are always formed in float32)."""
    layout: dict
    """layout_version, tiling policy and image-processor backend (``pil``) the samples were laid out with."""
    dataset: dict
    """dataset_digest and the shards directory the cache was made from."""
    student_layers: int | None = None
    """student depth the mid signal is pre-grouped for, or None for raw per-teacher-layer maps."""
    created: dict = field(default_factory=dict)
    """time, host, library versions, command line."""
    format: str = CACHE_FORMAT
    version: int = CACHE_VERSION

    def to_json(self) -> dict:
        data = asdict(self)
        data["signals"] = {name: asdict(spec) for name, spec in self.signals.items()}
        return data

    @classmethod
    def from_json(cls, data: dict, *, source: str = MANIFEST_NAME) -> CacheManifest:
        if data.get("format") != CACHE_FORMAT:
            raise ValueError(f"{source}: format {data.get('format')!r} is not {CACHE_FORMAT!r}; not a teacher cache")
        if data.get("version") not in READABLE_VERSIONS:
            raise ValueError(f"{source}: cache format version {data.get('version')!r}; this code reads versions "
                             f"{list(READABLE_VERSIONS)}. Re-create the cache with `python -m cache_teacher` of this version.")
        unknown = sorted(set(data.get("signals", {})) - set(SIGNALS))
        if unknown:
            raise ValueError(f"{source}: unknown signals {unknown}; known: {list(SIGNALS)}")
        fields = dict(data)
        fields["signals"] = {name: SignalSpec(**spec) for name, spec in data["signals"].items()}
        return cls(**fields)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=True)

    def settings(self) -> dict:
        """The fields that must match for a re-run to extend/resume this cache (creation info excluded)."""
        data = self.to_json()
        data.pop("created")
        return data

    def differences(self, other: CacheManifest) -> list[str]:
        """Names of the settings that differ from ``other`` (dotted paths, one level deep)."""
        mine, theirs = self.settings(), other.settings()
        diffs = []
        for name in sorted(set(mine) | set(theirs)):
            a, b = mine.get(name), theirs.get(name)
            if isinstance(a, dict) and isinstance(b, dict):
                diffs += [f"{name}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            elif a != b:
                diffs.append(name)
        return diffs
