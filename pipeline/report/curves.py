"""Training curves from a run's ``metrics.jsonl`` (one row per optimizer step).

Rows carry ``step``, ``loss`` (weighted total) and ``losses`` (raw per term: ce, p, r, d), and with
per-term gradients ``grad_ratio_weighted`` (each distillation term's lambda-weighted gradient norm over
CE's). ``plot_run`` draws every panel of one run (``python -m train_student.plot``); ``plot_runs`` compares
runs (the run report).
"""

from __future__ import annotations

import json
from pathlib import Path

from schemas.method import LOSS_TERMS, TERMS

PANELS = (("loss", "weighted total"), ("ce", "CE (answer tokens)"), ("p", "perception L_p"),
          ("r", "reasoning L_r"), ("d", "planning L_d"))
RATIO_TERMS = {"p": "-", "r": "--", "d": ":"}
"""Distillation terms of the gradient-ratio panel and their line styles."""
INERT_RATIO = 1e-3
"""The trainer's inert-term threshold (train_student.scale.INERT_RATIO), drawn as a reference line."""


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a training run directory?")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _series(rows: list[dict], name: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r["loss"] if name == "loss" else r.get("losses", {}).get(name)) for r in rows]
    points = [(s, v) for s, v in points if v is not None]
    return [s for s, _ in points], [v for _, v in points]


def _ratios(rows: list[dict], term: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r["grad_ratio_weighted"][term]) for r in rows if term in r.get("grad_ratio_weighted", {})]
    return [s for s, _ in points], [v for _, v in points]


def draw_grad_ratios(ax, runs: dict[str, list[dict]]) -> bool:
    """Log-scale panel: each distillation term's weighted gradient norm over CE's per optimizer step (one
    colour per run, one line style per term) and the inert threshold; False (nothing drawn) without data."""
    drawn = False
    for i, (label, rows) in enumerate(runs.items()):
        for term, style in RATIO_TERMS.items():
            steps, values = _ratios(rows, term)
            if steps:
                ax.plot(steps, [max(v, 1e-30) for v in values], style, label=f"{label} {term}", linewidth=1.2,
                        color=f"C{i}")
                drawn = True
    if drawn:
        ax.axhline(INERT_RATIO, color="grey", linewidth=0.8, linestyle="-.", label="inert below")
        ax.set_yscale("log")
        ax.set_title("weighted |g_term| / |g_ce| (log)", fontsize=9)
        ax.legend(fontsize=6)
    return drawn


def plot_runs(runs: dict[str, list[dict]], out_png: str | Path) -> Path:
    """One panel per loss term, one line per run, then the gradient-ratio panel (``draw_grad_ratios``);
    panels without data are left out."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels = [(name, title) for name, title in PANELS if any(_series(rows, name)[0] for rows in runs.values())]
    if not panels:
        raise ValueError(f"no loss values in the metrics of runs {sorted(runs)}")
    ratios = any(_ratios(rows, t)[0] for rows in runs.values() for t in RATIO_TERMS)
    columns = len(panels) + ratios
    fig, axes = plt.subplots(1, columns, figsize=(3.4 * columns, 3.0), squeeze=False)
    if ratios:
        draw_grad_ratios(axes[0][-1], runs)
        axes[0][-1].set_xlabel("optimizer step", fontsize=8)
        axes[0][-1].tick_params(labelsize=7)
        axes[0][-1].grid(alpha=0.3)
    for ax, (name, title) in zip(axes[0], panels):
        for i, (label, rows) in enumerate(runs.items()):
            steps, values = _series(rows, name)
            if steps:  # one colour per run across panels
                ax.plot(steps, values, label=label, linewidth=1.2, color=f"C{i}")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _section_series(rows: list[dict], section: str, name: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[section][name]) for r in rows if name in r.get(section, {})]
    return [p[0] for p in points], [p[1] for p in points]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """All panels of one run (``python -m train_student.plot``); returns the PNG path (default RUN_DIR/curves.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise FileNotFoundError(f"{run_dir / 'metrics.jsonl'} is empty: train first "
                                f"(python -m train_student ... --out {run_dir})")
    fig, axes = plt.subplots(2, 4, figsize=(20, 8))
    if not draw_grad_ratios(axes[0, 3], {"": rows}):
        axes[0, 3].set_title("no per-term gradients (plain mode)")
    axes[1, 3].axis("off")
    for term in LOSS_TERMS:
        axes[0, 0].plot(*_section_series(rows, "losses", term), label=term)
        axes[0, 1].plot(*_section_series(rows, "weights", term), label=term)
    pairs = sorted({pair for r in rows for pair in r.get("cos", {})})
    for pair in pairs:
        axes[0, 2].plot(*_section_series(rows, "cos", pair), label=pair)
    for term in TERMS:
        steps = [r["step"] for r in rows]
        axes[1, 0].plot(steps, [r["fired"]["anchor"][term] for r in rows], label=f"{term} vs ce")
        axes[1, 0].plot(steps, [r["fired"]["pairwise"][term] for r in rows], "--", label=f"{term} pairwise")
    axes[1, 1].plot([r["step"] for r in rows], [r["lr"] for r in rows])
    axes[1, 2].plot([r["step"] for r in rows], [r["samples_per_s"] for r in rows])
    titles = ["raw term losses", "term weights (lambdas)", "cosine between term gradients",
              "projections fired per step", "learning rate", "samples/s"]
    for ax, title in zip(axes[:, :3].flat, titles):
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
