"""``python -m train_student.plot RUN_DIR``: training curves from ``RUN_DIR/metrics.jsonl`` to a PNG.

Panels: raw term losses (log scale), term weights (lambdas; they move under reweighting), the
cosine between each pair of term gradients, projections fired per step, learning rate and samples/s.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from train_student.metrics import DISTILL_TERMS, TERM_ORDER, read_jsonl


def _series(rows: list[dict], section: str, name: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[section][name]) for r in rows if name in r.get(section, {})]
    return [p[0] for p in points], [p[1] for p in points]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the curves of a run; returns the PNG path (default RUN_DIR/curves.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file() or not path.stat().st_size:
        raise FileNotFoundError(f"{path} is missing or empty: train first (python -m train_student ... --out {run_dir})")
    rows = read_jsonl(path)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for term in TERM_ORDER:
        axes[0, 0].plot(*_series(rows, "losses", term), label=term)
        axes[0, 1].plot(*_series(rows, "weights", term), label=term)
    pairs = sorted({pair for r in rows for pair in r.get("cos", {})})
    for pair in pairs:
        axes[0, 2].plot(*_series(rows, "cos", pair), label=pair)
    for term in DISTILL_TERMS:
        steps = [r["step"] for r in rows]
        axes[1, 0].plot(steps, [r["fired"]["anchor"][term] for r in rows], label=f"{term} vs ce")
        axes[1, 0].plot(steps, [r["fired"]["pairwise"][term] for r in rows], "--", label=f"{term} pairwise")
    axes[1, 1].plot([r["step"] for r in rows], [r["lr"] for r in rows])
    axes[1, 2].plot([r["step"] for r in rows], [r["samples_per_s"] for r in rows])
    titles = ["raw term losses", "term weights (lambdas)", "cosine between term gradients",
              "projections fired per step", "learning rate", "samples/s"]
    for ax, title in zip(axes.flat, titles):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if any(r["losses"] for r in rows):
        axes[0, 0].set_yscale("log")
    fig.suptitle(f"{run_dir}: {len(rows)} optimizer steps")
    fig.tight_layout()
    target = Path(out) if out else run_dir / "curves.png"
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return target


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
