"""Model resolution, loading, real-size configs and the tiny-model factory.

``python -m pipeline.models``: argument parsing and one call into pipeline.models.tiny."""

from __future__ import annotations

import argparse

from pipeline.data.demo import vocabulary_corpus
from pipeline.models.pretrain_vision import Settings
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
    vision = sub.add_parser(
        "pretrain-vision", help="pretrain a tiny model's vision tower and projector on dense scene labels",
        description="Trains the vision tower and projector of MODEL (the language model is untouched) so that "
                    "each image token, as the language model receives it, tells what it shows: road-user kind, "
                    "colour, lane, moving or stopped, traffic-light state, sign. The labels come from the scene "
                    "model that draws the generated images (their own seeded stream, never a QA split's scenes); "
                    "no question or answer is seen. The stand-in for a real VLM's pretrained vision encoder: "
                    "make demo-teacher runs it before the teacher's CE training. Writes vision_pretrain.json "
                    "(settings, time, held-out per-token accuracy per head) beside the model.",
        epilog="example: python -m pipeline.models pretrain-vision --model runs/init --out runs/init --steps 1500")
    vision.add_argument("--model", required=True, help="model directory (tiny InternVL or Qwen2.5-VL)")
    vision.add_argument("--out", required=True, help="output directory (may be --model: updated in place)")
    defaults = Settings()
    for name, kind, text in (("scenes", int, "training scenes, one image each"), ("steps", int, "optimizer steps"),
                             ("batch", int, "images per step"), ("lr", float, "peak learning rate (AdamW)"),
                             ("seed", int, "seed of the scene stream, the heads and the sample order"),
                             ("heldout", int, "held-out scenes for the accuracy report")):
        vision.add_argument(f"--{name}", type=kind, default=getattr(defaults, name),
                            help=f"{text} (default {getattr(defaults, name)})")
    vision.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.command == "pretrain-vision":
        _pretrain_vision(parser, args)
        return
    out = build_tiny(args.family, args.role, args.out, seed=args.seed, corpus=vocabulary_corpus())
    print(f"wrote tiny {args.family} {args.role} to {out}")


def _pretrain_vision(parser: argparse.ArgumentParser, args) -> None:
    from pathlib import Path

    from pipeline.models.pretrain_vision import HEADS, run

    if not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model {args.model}: no config.json there; write one with `python -m pipeline.models tiny`")
    for name in ("scenes", "steps", "batch", "heldout"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.lr <= 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    settings = Settings(scenes=args.scenes, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                        heldout=args.heldout)
    report = run(args.model, args.out, settings, progress=not args.no_progress)
    shown = ", ".join(f"{head} {report['heldout_accuracy'][head]['shown']:.1f}%" for head in HEADS)
    print(f"vision pretraining: {report['seconds']} s, loss {report['first_loss']} -> {report['last_loss']}; "
          f"held-out accuracy on tokens that show something: {shown}; wrote {args.out}")


if __name__ == "__main__":
    main()
