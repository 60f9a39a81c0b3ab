"""The QA shard-set manifest: what `python -m pipeline.ingest` wrote, written last into the shard directory.

JSON shape (version 1)::

    {"format": "drive-kd/qa-shards", "version": 1, "dataset_digest": "<sha256 hex of the sorted keys>",
     "num_samples": 120, "shards": [{"name": "shard-000000.tar", "samples": 100}, ...],
     "counts": {"perception": 40, "reasoning": 40, "planning": 40},
     "skipped": [{"index": 17, "field": "images[0]", "reason": "..."}],
     "created": {"tool": "pipeline.ingest", ...}}
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec

from schemas.method import CAPABILITIES

SHARDS_FORMAT = "drive-kd/qa-shards"
SHARDS_VERSION = 1
MANIFEST_NAME = "manifest.json"


def shard_name(index: int) -> str:
    """File name of data shard `index`: shard-000000.tar, shard-000001.tar, ..."""
    return f"shard-{index:06d}.tar"


def dataset_digest(keys: Iterable[str]) -> str:
    """sha256 (hex) over the sorted sample keys, one per line: identifies the dataset by content."""
    digest = hashlib.sha256()
    for key in sorted(keys):
        digest.update(key.encode("utf-8") + b"\n")
    return digest.hexdigest()


@dataclass(frozen=True)
class ShardEntry:
    """One tar shard of the set."""

    name: str
    """File name inside the shard directory."""
    samples: int
    """Number of samples it holds."""


@dataclass(frozen=True)
class SkippedRecord:
    """A QA record left out by `ingest --skip-bad`."""

    index: int
    """Position of the record in the QA file."""
    field: str
    """The offending field (e.g. "images[2]", "question_type")."""
    reason: str
    """What was wrong with it."""


@dataclass
class ShardManifest:
    """Describes a shard set: its shards in order, the dataset digest and what ingest skipped."""

    version: int
    """Manifest format version (SHARDS_VERSION)."""
    dataset_digest: str
    """dataset_digest() of all sample keys."""
    shards: list[ShardEntry]
    """The shards, in sample order."""
    counts: dict[str, int]
    """Samples per capability (every capability present, zeros included)."""
    skipped: list[SkippedRecord] = field(default_factory=list)
    """Records left out by --skip-bad, in input order."""
    created: dict[str, Any] = field(default_factory=dict)
    """Provenance: tool, arguments, QA file digest, time."""

    @property
    def num_samples(self) -> int:
        return sum(entry.samples for entry in self.shards)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": SHARDS_FORMAT,
            "version": self.version,
            "dataset_digest": self.dataset_digest,
            "num_samples": self.num_samples,
            "shards": [{"name": entry.name, "samples": entry.samples} for entry in self.shards],
            "counts": dict(self.counts),
            "skipped": [{"index": s.index, "field": s.field, "reason": s.reason} for s in self.skipped],
            "created": dict(self.created),
        }

    @classmethod
    def from_json(cls, data: Any, *, where: str = MANIFEST_NAME) -> ShardManifest:
        """Read to_json output; `where` names the file in errors. Refuses other formats and versions."""
        fix = "re-run `python -m pipeline.ingest` with this version of the code to rewrite the shard set"
        if not isinstance(data, dict) or data.get("format") != SHARDS_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{where}: not a {SHARDS_FORMAT} manifest (format {found!r}). Fix: {fix}.")
        if data.get("version") != SHARDS_VERSION:
            raise ValueError(
                f"{where}: manifest version {data.get('version')!r}, this code reads version {SHARDS_VERSION}. "
                f"Fix: {fix}."
            )
        try:
            manifest = cls(
                version=data["version"],
                dataset_digest=data["dataset_digest"],
                shards=[ShardEntry(**entry) for entry in data["shards"]],
                counts={str(name): int(n) for name, n in data["counts"].items()},
                skipped=[SkippedRecord(**entry) for entry in data["skipped"]],
                created=dict(data["created"]),
            )
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise ValueError(f"{where}: malformed manifest ({type(err).__name__}: {err}). Fix: {fix}.") from err
        if sorted(manifest.counts) != sorted(CAPABILITIES) or sum(manifest.counts.values()) != manifest.num_samples:
            raise ValueError(
                f"{where}: counts {manifest.counts} do not match the {manifest.num_samples} samples of the "
                f"shards over capabilities {CAPABILITIES}. Fix: {fix}."
            )
        return manifest

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write atomically (temporary file, then rename) so readers never see a partial manifest."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: str) -> ShardManifest:
        """Read a manifest from a local path or fsspec URL."""
        with fsspec.open(str(path), "r", encoding="utf-8") as stream:
            try:
                data = json.load(stream)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}: not valid JSON ({err}). Fix: re-run `python -m pipeline.ingest` to rewrite it."
                ) from err
        return cls.from_json(data, where=str(path))
