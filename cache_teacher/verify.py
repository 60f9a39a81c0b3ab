"""Check a teacher cache: ``python -m cache_teacher.verify CACHE [--deep]``.

Every committed shard is checked against its commit marker (chunk count of every array, digest of
its Parquet index); ``--deep`` also decodes every chunk (crc32c checksums, compressed streams).
Prints every bad shard and signal; exits 1 if any, 0 if the cache is sound, 2 if it cannot be opened.
"""

from __future__ import annotations

import argparse
import json
import posixpath
import sys

import fsspec

from pipeline.cache.format import committed_shards, shard_problems
from schemas.cache import MANIFEST_NAME, CacheManifest


def verify_cache(root: str, *, deep: bool = False) -> dict[int, list[str]]:
    """Committed shard -> its problems (only damaged shards appear). ValueError if ``root`` is no cache."""
    fs, path = fsspec.core.url_to_fs(root)
    manifest_path = posixpath.join(path, MANIFEST_NAME)
    if not fs.exists(manifest_path):
        raise ValueError(f"{root}: no {MANIFEST_NAME}; not a teacher cache")
    CacheManifest.from_json(json.loads(fs.cat_file(manifest_path)), source=manifest_path)
    found = {shard: shard_problems(root, shard, deep=deep) for shard in sorted(committed_shards(root))}
    return {shard: problems for shard, problems in found.items() if problems}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m cache_teacher.verify", description=__doc__.splitlines()[0])
    p.add_argument("cache", help="cache directory (local path or fsspec URL)")
    p.add_argument("--deep", action="store_true", help="decode every chunk too (reads the whole cache)")
    args = p.parse_args(argv)
    try:
        damaged = verify_cache(args.cache, deep=args.deep)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    shards = len(committed_shards(args.cache))
    for problems in damaged.values():
        for problem in problems:
            print(problem)
    if damaged:
        print(f"{len(damaged)} of {shards} committed shard(s) damaged: {sorted(damaged)}. Re-cache them with the "
              "cache job's command plus --repair.", file=sys.stderr)
        sys.exit(1)
    print(f"cache {args.cache}: {shards} committed shard(s) sound ({'deep' if args.deep else 'counts and digests'})")


if __name__ == "__main__":
    main()
