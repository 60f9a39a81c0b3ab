"""The study's outputs: study.json, study.md (the paper's Table 3 layout), study.png and grad_ratios.json.

Every number is read from the scores.json files the evaluation wrote (pipeline.evaluation.scoring),
and study.json names the file each per-seed number came from. Values are percent on the held-out split.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from pipeline.evaluation.scoring import AVERAGE_COLUMN, TABLE_COLUMNS, load_scores
from pipeline.report.report import chance_row

COLUMNS = {**{c: column for c, column in TABLE_COLUMNS.items()}, "avg": AVERAGE_COLUMN}
"""study.json key -> scores.json table column."""


def table_values(table: dict) -> dict[str, float | None]:
    """{perception, reasoning, planning, avg} from a scores.json (or chance row) table."""
    return {key: table[column] for key, column in COLUMNS.items()}


def _spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = math.fsum(values) / len(values)
    var = math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def row_summary(per_seed: dict[int, Path]) -> dict:
    """One student row: its per-seed values with their sources, and mean / std over the seeds."""
    seeds = [{"seed": seed, **table_values(load_scores(path)["table"]), "eval": str(path)}
             for seed, path in sorted(per_seed.items())]
    mean, std = {}, {}
    for key in COLUMNS:
        present = [s[key] for s in seeds if s[key] is not None]
        mean[key], std[key] = _spread(present) if present else (None, None)
    return {"seeds": seeds, "mean": mean, "std": std}


def build_study(files: dict, config: dict) -> dict:
    """study.json content from run_study's evaluation files."""
    teacher_scores = Path(files["teacher"])
    return {
        "rows": {row: row_summary(per_seed) for row, per_seed in files["rows"].items()},
        "teacher": {**table_values(load_scores(teacher_scores)["table"]), "eval": str(teacher_scores)},
        "chance": table_values(chance_row(str(teacher_scores.parent))["table"]),
        "config": config,
    }


def _cell(mean: float | None, std: float | None = None) -> str:
    if mean is None:
        return "–"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def render_markdown(study: dict) -> str:
    """Table 3 layout: one row per model, Perception / Reasoning / Planning / Avg., mean ± std over seeds."""
    seeds = study["config"]["seeds"]
    lines = [f"# Study: held-out multiple-choice accuracy (%), mean ± std over {len(seeds)} seed(s) {seeds}\n",
             "| Row | " + " | ".join(COLUMNS.values()) + " |", "|---|" + "---:|" * len(COLUMNS)]
    lines.append("| teacher | " + " | ".join(_cell(study["teacher"][k]) for k in COLUMNS) + " |")
    for name, row in study["rows"].items():
        lines.append(f"| {name} | " + " | ".join(_cell(row["mean"][k], row["std"][k]) for k in COLUMNS) + " |")
    lines.append("| chance | " + " | ".join(_cell(study["chance"][k]) for k in COLUMNS) + " |")
    config = study["config"]
    lines += ["", f"Budget `{config['budget']}`: {json.dumps(config['sizes'])}.",
              "Rows are trainer flags on the shared student config (`config.rows` in study.json); "
              "every number is read from the scores.json named in study.json."]
    if "torch_threads" in config:  # a CPU run's weights, hence its scores, depend on it (float summation order)
        lines.append(f"Torch intra-op threads: {config['torch_threads']} (OMP_NUM_THREADS="
                     f"{config.get('OMP_NUM_THREADS') or 'unset'}); compare runs made with the same count.")
    if config.get("cache_codec_flags"):
        lines.append(f"Teacher caches written with `{' '.join(config['cache_codec_flags'])}` (default: lossless).")
    return "\n".join(lines) + "\n"


def plot(study: dict, path: Path) -> None:
    """Grouped bar chart: one group per capability and Avg., one bar per row, error bars = std."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = ["teacher", *study["rows"], "chance"]
    width = 0.8 / len(names)
    figure, axes = plt.subplots(figsize=(12, 4.5))
    for index, name in enumerate(names):
        if name in study["rows"]:
            means, stds = study["rows"][name]["mean"], study["rows"][name]["std"]
        else:
            means, stds = study[name], {}
        xs = [group + (index - (len(names) - 1) / 2) * width for group in range(len(COLUMNS))]
        heights = [means[k] or 0.0 for k in COLUMNS]
        errors = [stds.get(k) or 0.0 for k in COLUMNS]
        axes.bar(xs, heights, width, yerr=errors, capsize=2, label=name)
    axes.set_xticks(range(len(COLUMNS)), list(COLUMNS.values()))
    axes.set_ylabel("held-out MC accuracy (%)")
    axes.set_ylim(0, 100)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: no bar hidden
    axes.set_title(f"Study ({study['config']['budget']}, seeds {study['config']['seeds']})")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


RATIO_SOURCE = ("metrics.jsonl of every study run that logs gradient norms (the gradient-bank modes; sft and no-agp "
                "log none): weighted gradient-norm ratio to CE per term at the first optimizer step, its median over "
                "the run and at the last step; the last step's CE loss; the balanced runs' calibrated lambdas")


def grad_ratio_summary(runs_dir: Path) -> dict:
    """{"source", "runs": {"seed-S/ROW": {"grad_ratio_weighted": {term: {step1, median, last}}, "final_ce",
    ["calibrated_lambdas"]}}} from the runs' metrics.jsonl (METHOD §9: is a term inert, does it dominate?)."""
    runs = {}
    for metrics in sorted(runs_dir.glob("*/*/metrics.jsonl")):
        rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
        logged = [row["grad_ratio_weighted"] for row in rows if row.get("grad_ratio_weighted")]
        if not logged:
            continue
        entry = {"grad_ratio_weighted": {term: {"step1": logged[0][term],
                                                "median": statistics.median(r[term] for r in logged),
                                                "last": logged[-1][term]} for term in logged[0]},
                 "final_ce": rows[-1]["losses"]["ce"]}
        if "calibration" in rows[0]:
            entry["calibrated_lambdas"] = rows[0]["calibration"]["lambdas"]
        runs[f"{metrics.parent.parent.name}/{metrics.parent.name}"] = entry
    return {"source": RATIO_SOURCE, "runs": runs}


def write_outputs(study: dict, out: Path) -> None:
    """study.json, study.md, study.png and grad_ratios.json (from OUT/runs) into `out`."""
    (out / "study.json").write_text(json.dumps(study, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "study.md").write_text(render_markdown(study), encoding="utf-8")
    plot(study, out / "study.png")
    ratios = grad_ratio_summary(out / "runs")
    (out / "grad_ratios.json").write_text(json.dumps(ratios, indent=1) + "\n", encoding="utf-8")
