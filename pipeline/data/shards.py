"""Reader of the QA shard sets written by `python -m pipeline.ingest`, shared by the teacher cache job and
the student trainer. Paths may be local or fsspec URLs (s3://, gs://, ...).

Reading is a chain of small generator stages: tar members -> samples grouped by key -> decoded Sample.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import fsspec
from PIL import Image

from schemas.qa import QARecord
from schemas.shards import MANIFEST_NAME, ShardManifest

_REINGEST = "re-run `python -m pipeline.ingest` to rewrite the shard set"


class ShardError(ValueError):
    """A shard file that cannot be read as written by ingest (truncated, corrupt, inconsistent)."""


@dataclass
class Sample:
    """One QA sample read back from a shard."""

    key: str
    """Sample key (equals record.key)."""
    record: QARecord
    """The normalised record; record.images[i].file names the member holding images[i]."""
    images: list[Image.Image]
    """Decoded RGB images, in record order."""
    shard: str
    """Path or URL of the shard the sample came from."""


def _join(shards_dir: str | os.PathLike[str], name: str) -> str:
    return f"{str(shards_dir).rstrip('/')}/{name}"


def read_manifest(shards_dir: str | os.PathLike[str]) -> ShardManifest:
    """The manifest of the shard set in `shards_dir` (local path or fsspec URL)."""
    path = _join(shards_dir, MANIFEST_NAME)
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.exists(fs_path):
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} in {shards_dir}: not an ingested shard set, or ingest did not finish. "
            f"Fix: run `python -m pipeline.ingest --qa QA.json --image-root IMAGES --out {shards_dir}` first."
        )
    return ShardManifest.read(path)


def shard_paths(shards_dir: str | os.PathLike[str]) -> list[str]:
    """Paths (or URLs) of the shards of `shards_dir`, in sample order, as listed by its manifest."""
    return [_join(shards_dir, entry.name) for entry in read_manifest(shards_dir).shards]


def tar_members(stream: BinaryIO, shard: str) -> Iterator[tuple[str, str, bytes]]:
    """(key, member name, bytes) of every file in a tar stream; ShardError if it is truncated or corrupt."""
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, _, member = info.name.rpartition("/")[2].partition(".")
                yield key, member, tar.extractfile(info).read()
    except (tarfile.TarError, EOFError) as err:
        raise ShardError(f"shard {shard} is truncated or corrupt ({err}). Fix: {_REINGEST}.") from err


def group_by_key(members: Iterator[tuple[str, str, bytes]], shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group consecutive members of one key into (key, {member name: bytes})."""
    key, files = None, {}
    for member_key, member, data in members:
        if member_key != key:
            if key is not None:
                yield key, files
            key, files = member_key, {}
        if member in files:
            raise ShardError(f"shard {shard}, sample {key}: member {member!r} appears twice. Fix: {_REINGEST}.")
        files[member] = data
    if key is not None:
        yield key, files


def decode_sample(key: str, files: dict[str, bytes], shard: str) -> Sample:
    """Build a Sample from its members: the json record and the images it references."""
    where = f"shard {shard}, sample {key}"
    if "json" not in files:
        raise ShardError(
            f"{where}: no 'json' member (found {sorted(files)}); the shard is probably truncated. Fix: {_REINGEST}."
        )
    try:
        record = QARecord.from_json(json.loads(files["json"]))
    except ValueError as err:
        raise ShardError(f"{where}: {err}") from err
    if record.key != key:
        raise ShardError(f"{where}: its json names key {record.key!r}. Fix: {_REINGEST}.")
    images = []
    for ref in record.images:
        if ref.file not in files:
            raise ShardError(
                f"{where}: the record references image member {ref.file!r}, which the sample lacks "
                f"(members: {sorted(files)}). Fix: {_REINGEST}."
            )
        try:
            images.append(Image.open(io.BytesIO(files[ref.file])).convert("RGB"))
        except (OSError, SyntaxError, ValueError) as err:
            raise ShardError(f"{where}: image {ref.file!r} does not decode ({err}). Fix: {_REINGEST}.") from err
    return Sample(key=key, record=record, images=images, shard=shard)


def iter_shard(path: str, *, expected_samples: int | None = None) -> Iterator[Sample]:
    """Samples of one tar shard, in order.

    `expected_samples` (the manifest count) also catches a shard cut exactly between two samples, which
    tar itself cannot tell from a complete file.
    """
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.exists(fs_path):
        raise ShardError(f"shard {path} does not exist. Fix: {_REINGEST}.")
    count = 0
    with fs.open(fs_path, "rb") as stream:
        for key, files in group_by_key(tar_members(stream, path), path):
            yield decode_sample(key, files, path)
            count += 1
    if expected_samples is not None and count != expected_samples:
        raise ShardError(
            f"shard {path} holds {count} samples, its manifest says {expected_samples}: the file is truncated "
            f"or was replaced. Fix: {_REINGEST}."
        )


def iter_samples(shards_dir: str | os.PathLike[str]) -> Iterator[Sample]:
    """Every sample of the shard set in `shards_dir`, shard by shard, checking each shard's sample count."""
    for entry in read_manifest(shards_dir).shards:
        yield from iter_shard(_join(shards_dir, entry.name), expected_samples=entry.samples)
