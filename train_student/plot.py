"""``python -m train_student.plot RUN_DIR``: training curves from ``RUN_DIR/metrics.jsonl`` to a PNG
(drawn by ``pipeline.report.curves.plot_run``: losses, weights, gradient cosines and ratios, projections,
learning rate, samples/s)."""

from __future__ import annotations

import argparse
import sys

from pipeline.report.curves import plot_run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train_student.plot",
                                     description="Plot the training curves of a run directory to a PNG.")
    parser.add_argument("run_dir", help="run directory written by python -m train_student (holds metrics.jsonl)")
    parser.add_argument("--out", help="PNG path (default RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    try:
        print(plot_run(args.run_dir, args.out))
    except FileNotFoundError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
