"""Check a checkpoint before spending GPU hours on it.

``python -m pipeline.check_model``: argument parsing and one call into pipeline.models.check."""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.models.check import check_model, render
from pipeline.models.load import resolve_model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.check_model", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Print a checkpoint's family, layers and heads, the vision tokens per image under the one-tile\n"
        "policy, the layout of a 1-view and a 6-view record (S, answer span, vision spans, digest), the\n"
        "teacher/student digest agreement, one captured sample at the captured layers and the estimated\n"
        "peak memory of the cache forward. Stops with the fix for a remote-code InternVL directory, a model\n"
        "of another family or a tokenizer without the image tokens.",
        epilog="examples:\n"
        "  python -m pipeline.check_model models/InternVL3-8B --student models/InternVL3-1B\n"
        "  python -m pipeline.check_model InternVL3-38B --data data/shards --no-capture   # names under $MODEL_DIR\n"
        "  make check-model MODEL=InternVL3-8B CHECK_STUDENT=InternVL3-1B\n\n"
        "The capture runs in fp32 on cuda when present, else on the CPU (use --no-capture for a large model on\n"
        "a small machine); the memory figure is a fake-tensor trace, no device needed.",
    )
    parser.add_argument("model", help="checkpoint folder (save_pretrained) or a known name under $MODEL_DIR")
    parser.add_argument("--student", help="student checkpoint whose layouts must agree with the model's")
    parser.add_argument("--data", help="shard folder: take the 1-view and 6-view records from it (default: drawn)")
    parser.add_argument("--device", help="device of the capture (default: cuda when available, else cpu)")
    parser.add_argument("--no-capture", dest="capture", action="store_false", help="skip the captured forward")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory estimate")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        student = resolve_model(args.student) if args.student else None
        report = check_model(resolve_model(args.model), student=student, data=args.data, device=args.device,
                             capture=args.capture, memory=args.memory)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    print(json.dumps(report, indent=2) if args.json else render(report))


if __name__ == "__main__":
    main()
