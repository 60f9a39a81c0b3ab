"""QA ingest: the authors' QA JSON plus camera images -> reproducible WebDataset tar shards + manifest.json.

``python -m pipeline.ingest``: argument parsing and one call into pipeline.data.ingest."""

from __future__ import annotations

import argparse
import sys

from pipeline.data.ingest import ingest
from schemas.method import CAPABILITIES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.ingest",
        description="Convert a Drive-KD QA JSON file and its camera images into WebDataset tar shards\n"
        "(shard-000000.tar, ...) plus manifest.json. Re-running over the same input gives identical shards.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  python -m pipeline.ingest --qa data/demo/qa.json --image-root data/demo --out data/shards\n"
        "  python -m pipeline.ingest --qa drive_kd_train.json --image-root /data/nuscenes \\\n"
        "      --out /data/shards --shard-size 500 --on-unknown-type reasoning --skip-bad\n\n"
        "Image paths may be absolute, relative to --image-root, or start with the authors' '.../'\n"
        "prefix (which stands for --image-root).",
    )
    parser.add_argument("--qa", required=True, help="QA JSON file in the authors' format (list of records)")
    parser.add_argument("--image-root", required=True, help="directory the image paths are relative to")
    parser.add_argument("--out", required=True, help="output directory for the shards and manifest.json")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument(
        "--on-unknown-type", choices=CAPABILITIES, default=None,
        help="capability given to records with an unknown label (default: such records are errors)",
    )
    parser.add_argument(
        "--skip-bad", action="store_true",
        help="leave out malformed records and records with missing/unreadable images, counting them in "
        "the manifest (default: stop with a list of them)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        manifest = ingest(
            args.qa, args.image_root, args.out,
            shard_size=args.shard_size, on_unknown_type=args.on_unknown_type, skip_bad=args.skip_bad,
        )
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    counts = ", ".join(f"{name} {n}" for name, n in manifest.counts.items())
    print(
        f"wrote {manifest.num_samples} samples ({counts}) in {len(manifest.shards)} shards to {args.out}; "
        f"skipped {len(manifest.skipped)}; dataset digest {manifest.dataset_digest[:16]}"
    )


if __name__ == "__main__":
    main()
