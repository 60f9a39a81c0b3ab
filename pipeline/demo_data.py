"""Generate a synthetic driving QA set in the Drive-KD authors' format (METHOD.md section 1).

``python -m pipeline.demo_data``: argument parsing and one call into pipeline.data.demo."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.data.demo import MAX_IMAGE_SIZE, SIX_VIEW_SHARE, VIEW_CHOICES, _check_arguments, _check_int, generate
from pipeline.data.scenes import MIN_IMAGE_SIZE


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.demo_data",
        description="Draw synthetic driving scenes (road, lanes, cars, trucks, buses, motorcycles, pedestrians, "
                    "traffic lights, stop and speed limit signs) and write multiple-choice perception, reasoning "
                    "and planning questions about them in the Drive-KD authors' QA format: DIR/qa.json plus "
                    "DIR/images/<scene>/<CAM>.png. Answers follow from the scene; output is deterministic "
                    "for a seed.")
    parser.add_argument("--out", required=True, help="output folder (created; qa.json and images/ are overwritten)")
    parser.add_argument("--samples", type=int, default=240, help="number of QA records, one scene each (default 240)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--image-size", type=int, default=112,
                        help=f"side of the square images in pixels, {MIN_IMAGE_SIZE}-{MAX_IMAGE_SIZE} (default 112)")
    parser.add_argument("--views", choices=VIEW_CHOICES, default="mixed",
                        help="1: CAM_FRONT only (BDD100K-like); 6: nuScenes surround cameras; mixed (default): "
                             f"about {SIX_VIEW_SHARE:.0%}% six-camera records")
    parser.add_argument("--captions", type=int, default=0,
                        help="also write N open-ended CAM_FRONT scene descriptions (light, sign, vehicle ahead, side "
                             "lanes, pedestrians, plan; capability perception), shuffled in: dense supervision for "
                             "training a tiny teacher from scratch (make demo-teacher; default 0)")
    args = parser.parse_args(argv)
    try:
        _check_arguments(args.samples, args.seed, args.image_size, args.views)
        _check_int("captions", args.captions, 0)
    except ValueError as error:
        parser.error(str(error))
    records = generate(args.out, samples=args.samples, seed=args.seed, image_size=args.image_size, views=args.views,
                       captions=args.captions)
    images = sum(len(record["images"]) for record in records)
    print(f"wrote {len(records)} records and {images} images to {Path(args.out) / 'qa.json'}")


if __name__ == "__main__":
    main()
