"""DriveLM-nuScenes QA -> the authors' QA format that ``python -m pipeline.ingest`` reads.

``python -m pipeline.drivelm``: argument parsing and one call into pipeline.data.drivelm."""

from __future__ import annotations

import argparse
import sys

from pipeline.data.drivelm import convert_file


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.drivelm", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert DriveLM-nuScenes QA (OpenDriveLab/DriveLM, e.g. v1_1_train_nus.json: scene -> key\n"
        "frames -> QA per category) into one authors'-format record per QA pair: the six cameras in nuScenes\n"
        "order (paths relative to the nuScenes root), categories perception -> perception, prediction ->\n"
        "reasoning, planning and behavior -> planning, object references <cN,CAM,x,y> as fractions of the\n"
        "1600x900 frame. The same input gives byte-identical output.",
        epilog="examples:\n"
        "  python -m pipeline.drivelm --qa v1_1_train_nus.json --out data/drivelm_qa.json\n"
        "  python -m pipeline.ingest --qa data/drivelm_qa.json --image-root /data/nuscenes --out data/shards\n"
        "  python -m pipeline.drivelm --qa v1_1_train_nus.json --out qa_pixels.json --keep-pixel-coords --skip-bad\n\n"
        "The output is {\"meta\": {category_map, counts, skipped, ...}, \"records\": [...]}; each record keeps\n"
        "scene_token, frame_token, drivelm_category and drivelm_index.",
    )
    parser.add_argument("--qa", required=True, help="DriveLM-nuScenes QA JSON file")
    parser.add_argument("--out", required=True, help="output JSON file in the authors' format")
    parser.add_argument("--keep-pixel-coords", action="store_true",
                        help="keep object references in pixels (default: fractions of the 1600x900 frame)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="leave out malformed entries, listing them under meta.skipped (default: stop with a "
                        "list of them)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        meta = convert_file(args.qa, args.out, keep_pixel_coords=args.keep_pixel_coords, skip_bad=args.skip_bad)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    counts = ", ".join(f"{name} {n}" for name, n in meta["counts"].items())
    print(f"wrote {sum(meta['counts'].values())} records ({counts}) from {meta['frames']} key frames to {args.out}; "
          f"skipped {len(meta['skipped'])}")


if __name__ == "__main__":
    main()
