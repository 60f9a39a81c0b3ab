"""Training curves from a run's ``metrics.jsonl`` (one row per optimizer step).

Rows carry ``step``, ``loss`` (weighted total) and ``losses`` (raw per term: ce, p, r, d); the
trainer's plot command and the run report both draw them with ``plot_runs``.
"""

from __future__ import annotations

import json
from pathlib import Path

PANELS = (("loss", "weighted total"), ("ce", "CE (answer tokens)"), ("p", "perception L_p"),
          ("r", "reasoning L_r"), ("d", "planning L_d"))


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a training run directory?")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _series(rows: list[dict], name: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r["loss"] if name == "loss" else r.get("losses", {}).get(name)) for r in rows]
    points = [(s, v) for s, v in points if v is not None]
    return [s for s, _ in points], [v for _, v in points]


def plot_runs(runs: dict[str, list[dict]], out_png: str | Path) -> Path:
    """One panel per loss term, one line per run; panels without data are left out."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels = [(name, title) for name, title in PANELS if any(_series(rows, name)[0] for rows in runs.values())]
    if not panels:
        raise ValueError(f"no loss values in the metrics of runs {sorted(runs)}")
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.0), squeeze=False)
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
