"""Model resolution, loading, real-size configs and the tiny-model factory.

``python -m pipeline.models``: argument parsing and one call into pipeline.models.tiny."""

from __future__ import annotations

import argparse

from pipeline.data.demo import vocabulary_corpus
from pipeline.models.processors import FAMILIES
from pipeline.models.tiny import TINY_LM, build_tiny


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.models",
        description="Model utilities. `tiny` writes a random-initialised tiny InternVL or Qwen2.5-VL model "
                    "(native transformers classes) with a locally trained tokenizer and its processor, "
                    "loadable offline with AutoModelForImageTextToText and pipeline.processors.load_processor.",
        epilog="example: python -m pipeline.models tiny --family internvl --role teacher --out models/demo-teacher")
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("tiny", help="write a tiny random-initialised model directory")
    tiny.add_argument("--family", choices=FAMILIES, required=True)
    tiny.add_argument("--role", choices=sorted(TINY_LM), required=True,
                      help="teacher: 6 layers, 8 heads; student: 4 layers, 4 heads (same tokenizer and vision tokens)")
    tiny.add_argument("--out", required=True, help="output directory (save_pretrained layout)")
    tiny.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    args = parser.parse_args(argv)
    out = build_tiny(args.family, args.role, args.out, seed=args.seed, corpus=vocabulary_corpus())
    print(f"wrote tiny {args.family} {args.role} to {out}")


if __name__ == "__main__":
    main()
