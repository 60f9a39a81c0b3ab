"""QA ingest: the authors' QA JSON plus camera images -> reproducible WebDataset tar shards + manifest.json.

Each sample of shard-NNNNNN.tar holds `<key>.json` (the normalised QARecord) and `<key>.img0.<ext>`,
`<key>.img1.<ext>`, ... (the source image bytes, unchanged). Keys come from content, so re-running
over the same input gives byte-identical shards. manifest.json is written last.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import BinaryIO

import webdataset
from PIL import Image
from tqdm import tqdm

from schemas.method import CAPABILITIES
from schemas.qa import QARecord, RecordError, parse_records
from schemas.shards import (
    MANIFEST_NAME,
    SHARDS_VERSION,
    ShardEntry,
    ShardManifest,
    SkippedRecord,
    dataset_digest,
    shard_name,
)

AUTHORS_PREFIX = ".../"
_LEADING_DOTS = ("..", ".", "...")


def candidate_paths(raw: str, image_root: Path) -> list[Path]:
    """Where an image path of the QA file may lie, most literal first.

    A leading ".../" (the authors' prefix) stands for `image_root`; absolute paths are taken as they
    are; other paths are relative to `image_root`. Then, for paths whose prefix does not exist here,
    the path is tried under `image_root` after stripping leading "../", "./", ".../" and then one
    leading directory at a time (e.g. ".../nuscenes/samples/CAM_FRONT/x.jpg" with
    image_root=/data/nuscenes also finds /data/nuscenes/samples/CAM_FRONT/x.jpg).
    """
    if raw.startswith(AUTHORS_PREFIX):
        literal = image_root / raw[len(AUTHORS_PREFIX):]
    else:
        literal = image_root / raw  # an absolute `raw` replaces image_root
    parts = list(PurePath(raw).parts)
    if parts and PurePath(raw).anchor:
        parts = parts[1:]
    while parts and parts[0] in _LEADING_DOTS:
        parts = parts[1:]
    shorter = [image_root.joinpath(*parts[start:]) for start in range(len(parts))]
    return list(dict.fromkeys([literal, *shorter]))


def _extension(path: Path, image_format: str | None) -> str:
    ext = path.suffix.lower().lstrip(".") or (image_format or "bin").lower()
    return "jpg" if ext == "jpeg" else ext


def load_images(record: QARecord, image_root: Path) -> list[tuple[bytes, str]]:
    """(bytes, extension) of every image of `record`, each checked with PIL's verify().

    Raises RecordError naming the first missing or unreadable image.
    """
    loaded = []
    for i, ref in enumerate(record.images):
        candidates = candidate_paths(ref.source_path, image_root)
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise RecordError(
                record.source, record.index, f"images[{i}]",
                f"{ref.source_path!r} not found (tried {candidates[0]}"
                + (f" and {len(candidates) - 1} shorter paths under {image_root})" if len(candidates) > 1 else ")"),
                "correct the path, or point --image-root at the directory the paths are relative to "
                "(a leading '.../' stands for --image-root)",
            )
        try:
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as image:
                image_format = image.format
                image.verify()
        except Exception as err:  # PIL signals corrupt files with many exception types; all mean "unreadable"
            raise RecordError(
                record.source, record.index, f"images[{i}]",
                f"{path} is not a readable image ({type(err).__name__}: {err})",
                "replace the file with a valid image",
            ) from err
        loaded.append((data, _extension(path, image_format)))
    return loaded


def content_key(record: QARecord, images: list[bytes]) -> str:
    """16 hex chars of sha256 over capability, question, answer and the image bytes: stable across runs."""
    digest = hashlib.sha256()
    for text in (record.capability, record.question, record.answer):
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "big") + encoded)
    for data in images:
        digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest()[:16]


class ShardWriter:
    """Writes samples into shard-000000.tar, shard-000001.tar, ... of `directory`, `shard_size` per shard.

    Tar headers are fixed (mtime 0, uid/gid 0, fixed names and mode) so equal input gives equal bytes.
    """

    def __init__(self, directory: Path, *, shard_size: int):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}. Fix: pass a positive --shard-size.")
        self.directory = directory
        self.shard_size = shard_size
        self.shards: list[ShardEntry] = []
        self._file: BinaryIO | None = None
        self._tar: webdataset.TarWriter | None = None
        self._count = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Add one sample: `members` maps member names ("json", "img0.jpg") to bytes."""
        if self._tar is None or self._count == self.shard_size:
            self._open_next()
        self._tar.write({"__key__": key, **members})
        self._count += 1

    def _open_next(self) -> None:
        self.close()
        self._file = open(self.directory / shard_name(len(self.shards)), "wb")
        self._tar = webdataset.TarWriter(
            self._file, encoder=False, mtime=0, user="drive-kd", group="drive-kd", mode=0o644
        )
        self._count = 0

    def close(self) -> None:
        """Finish the open shard (if any) and record it in `shards`."""
        if self._tar is None:
            return
        self._tar.close()
        self._file.close()
        self.shards.append(ShardEntry(name=shard_name(len(self.shards)), samples=self._count))
        self._tar = None
        self._file = None


def _write_samples(
    records: list[QARecord], image_root: Path, directory: Path, shard_size: int
) -> tuple[list[QARecord], list[ShardEntry], list[RecordError]]:
    """Write every record whose images load; returns (written records, shards, image errors)."""
    seen: dict[str, int] = {}
    written: list[QARecord] = []
    errors: list[RecordError] = []
    with ShardWriter(directory, shard_size=shard_size) as writer:
        for record in tqdm(records, desc="ingest", unit="record"):
            try:
                images = load_images(record, image_root)
            except RecordError as err:
                errors.append(err)
                continue
            base = content_key(record, [data for data, _ in images])
            duplicates = seen.get(base, 0)
            seen[base] = duplicates + 1
            key = f"{base}-{duplicates}" if duplicates else base
            refs = tuple(
                replace(ref, file=f"img{i}.{ext}") for i, (ref, (_, ext)) in enumerate(zip(record.images, images))
            )
            final = replace(record, key=key, images=refs)
            members = {ref.file: data for ref, (data, _) in zip(refs, images)}
            members["json"] = json.dumps(final.to_json(), ensure_ascii=False, sort_keys=True).encode("utf-8")
            writer.write(key, members)
            written.append(final)
    return written, writer.shards, errors


def describe_errors(errors: list[RecordError], *, total: int, source: str, limit: int = 10) -> str:
    """A report of bad records: the first `limit` with index, field and reason, the count, the fixes."""
    shown = errors[:limit]
    head = f"{len(errors)} of {total} records in {source} are unusable"
    lines = [head + (f" (first {limit} shown):" if len(errors) > limit else ":")]
    lines += [f"  record {err.index}, field '{err.field}': {err.problem}" for err in shown]
    if len(errors) > limit:
        lines.append(f"  ... and {len(errors) - limit} more")
    lines += [f"Fix: {fix}" for fix in dict.fromkeys(err.fix for err in shown)]
    return "\n".join(lines)


def _load_qa(qa_path: Path) -> object:
    if not qa_path.is_file():
        raise FileNotFoundError(f"QA file {qa_path} not found. Fix: pass the authors' QA JSON with --qa.")
    try:
        return json.loads(qa_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{qa_path}: not valid UTF-8 JSON ({err}). Fix: repair or re-export the file.") from err


def _publish(staging: Path, out_dir: Path, manifest: ShardManifest) -> None:
    """Move the new shards into `out_dir`, drop stale shards, write the manifest last."""
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    for entry in manifest.shards:
        os.replace(staging / entry.name, out_dir / entry.name)
    names = {entry.name for entry in manifest.shards}
    for stale in sorted(out_dir.glob("shard-*.tar")):
        if stale.name not in names:
            stale.unlink()
    manifest.write(out_dir / MANIFEST_NAME)


def _manifest(
    written: list[QARecord], shards: list[ShardEntry], errors: list[RecordError], created: dict[str, object]
) -> ShardManifest:
    return ShardManifest(
        version=SHARDS_VERSION,
        dataset_digest=dataset_digest(record.key for record in written),
        shards=shards,
        counts={c: sum(record.capability == c for record in written) for c in CAPABILITIES},
        skipped=[SkippedRecord(index=err.index, field=err.field, reason=err.problem) for err in errors],
        created=created,
    )


def ingest(
    qa_path: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    shard_size: int = 1000,
    on_unknown_type: str | None = None,
    skip_bad: bool = False,
) -> ShardManifest:
    """Turn a QA JSON file and its images into WebDataset shards under `out_dir`; returns the manifest.

    Bad records (malformed, unknown label without `on_unknown_type`, missing or unreadable image) raise
    one ValueError listing them, leaving `out_dir` untouched, unless `skip_bad`: then they are left
    out, listed in the manifest and reported on stderr.
    """
    qa_path, image_root, out_dir = Path(qa_path), Path(image_root), Path(out_dir)
    if not image_root.is_dir():
        raise FileNotFoundError(
            f"image root {image_root} is not a directory. Fix: pass the directory the QA image paths are "
            "relative to with --image-root."
        )
    parsed = parse_records(_load_qa(qa_path), source=qa_path.name, on_unknown_type=on_unknown_type)
    created = {
        "tool": "pipeline.ingest",
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "qa_file": str(qa_path),
        "qa_sha256": hashlib.sha256(qa_path.read_bytes()).hexdigest(),
        "image_root": str(image_root),
        "arguments": {"shard_size": shard_size, "on_unknown_type": on_unknown_type, "skip_bad": skip_bad},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".ingest-", dir=out_dir))
    try:
        written, shards, image_errors = _write_samples(parsed.records, image_root, staging, shard_size)
        errors = sorted(parsed.errors + image_errors, key=lambda err: err.index)
        report = describe_errors(errors, total=parsed.total, source=qa_path.name) if errors else ""
        if errors and not skip_bad:
            raise ValueError(
                f"{report}\nOr pass --skip-bad to leave these records out (they are counted in {MANIFEST_NAME})."
            )
        if not written:
            raise ValueError(f"{qa_path} gave no usable records. Fix: check the file and --image-root.")
        manifest = _manifest(written, shards, errors, created)
        if report:
            print(f"skipped (--skip-bad): {report}", file=sys.stderr)
        _publish(staging, out_dir, manifest)
    finally:
        shutil.rmtree(staging)
    return manifest
