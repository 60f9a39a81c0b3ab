"""The run report: ``python -m pipeline.report`` writes ``REPORT_DIR/report.md`` and its PNGs.

Sections: the score table (teacher, SFT baseline, Drive-KD student) from the evaluation files, loss
curves of the training runs with each distillation term, gradient-conflict statistics (projections
fired, pairwise cosines), cache size per signal, and text-to-vision attention overlays of a few
held-out samples per capability (first decoder layer, each model over the camera views). Every
number in the report is read from the files it names.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pipeline.attention.capture import AttentionCapture, enable_capture
from pipeline.attention.layout import build_layout
from pipeline.attention.maps import tv_block
from pipeline.cache.plot import draw_overlays, view_heats
from pipeline.cache.reader import open_cache
from pipeline.data.shards import iter_samples
from pipeline.evaluation.choices import parse_options
from pipeline.evaluation.scoring import AVERAGE_COLUMN, TABLE_COLUMNS, load_scores, read_predictions, render_table
from pipeline.models.load import load_model
from pipeline.models.processors import load_processor
from pipeline.report.curves import plot_runs, read_metrics
from schemas.method import CAPABILITIES, TERM_ROLE, TERMS

TERM_NAMES = {"ce": "CE", **TERM_ROLE}


def _pairs(text_list: list[str], what: str) -> dict[str, str]:
    pairs = {}
    for item in text_list or []:
        label, sep, value = item.partition("=")
        if not sep or not label or not value:
            raise ValueError(f"{what} {item!r}: expected LABEL=PATH")
        pairs[label] = value
    return pairs


def chance_row(eval_dir: str) -> dict:
    """Expected % of a uniform guess over each multiple-choice question's options, per capability."""
    per_capability: dict[str, list[float]] = {c: [] for c in CAPABILITIES}
    for prediction in read_predictions(Path(eval_dir) / "predictions.jsonl"):
        options = parse_options(prediction.question)
        if prediction.multiple_choice and options:
            per_capability[prediction.capability].append(100.0 / len(options))
    table = {TABLE_COLUMNS[c]: sum(v) / len(v) if v else None for c, v in per_capability.items()}
    present = [v for v in table.values() if v is not None]
    table[AVERAGE_COLUMN] = sum(present) / len(present) if present else None
    return {"label": "chance (uniform guess)", "table": table}


def score_section(evals: dict[str, str]) -> str:
    runs = []
    for label, path in evals.items():
        scores = dict(load_scores(path))
        scores["label"] = label
        runs.append(scores)
    runs.append(chance_row(next(iter(evals.values()))))
    notes = [f"- {label}: `{path}/scores.json`" for label, path in evals.items()]
    return "## Scores (held-out split, % per capability)\n\n" + render_table(runs) + "\nSources:\n" + \
        "\n".join(notes) + "\n- chance: one over the number of lettered options of each multiple-choice question\n"


def gradient_section(label: str, rows: list[dict]) -> str:
    """Projections fired per term (summed over steps) and mean pairwise gradient cosines."""
    fired = {kind: {t: sum(r["fired"][kind].get(t, 0) for r in rows if "fired" in r) for t in TERMS}
             for kind in ("anchor", "pairwise")}
    cos: dict[str, list[float]] = {}
    for r in rows:
        for pair, value in r.get("cos", {}).items():
            cos.setdefault(pair, []).append(value)
    lines = [f"### {label}: gradient conflicts over {len(rows)} optimizer steps\n",
             "| term | anchor projections fired (vs CE) | pairwise projections fired |", "|---|---:|---:|"]
    lines += [f"| {TERM_NAMES[t]} | {fired['anchor'][t]:.0f} | {fired['pairwise'][t]:.0f} |" for t in TERMS]
    if cos:
        lines += ["", "| gradient pair | mean cosine | min | max |", "|---|---:|---:|---:|"]
        for pair, values in sorted(cos.items()):
            a, b = pair.split("/")
            lines.append(f"| {TERM_NAMES[a]} / {TERM_NAMES[b]} | {sum(values) / len(values):+.3f} | "
                         f"{min(values):+.3f} | {max(values):+.3f} |")
    return "\n".join(lines) + "\n"


def cache_section(cache_dir: str) -> str:
    """Stored bytes per signal against raw float16 full S x S maps."""
    cache = open_cache(cache_dir)
    root = Path(cache_dir)
    lines = [f"## Cache `{cache_dir}` ({len(cache)} samples, codec `{cache.manifest.codec['name']}`, "
             f"teacher {cache.manifest.teacher['name']})\n",
             "| signal | teacher layers | stored bytes/sample | raw fp16 full maps bytes/sample | ratio |",
             "|---|---|---:|---:|---:|"]
    rows = list(cache.index.values())
    for signal, spec in cache.manifest.signals.items():
        stored = sum(f.stat().st_size for f in root.glob(f"shards/*.zarr/{signal}/**/c/**/*") if f.is_file())
        raw = sum(2 * r["seq_len"] ** 2 * (r[f"{signal}_shape"][0] if signal == "mid" else 1) for r in rows)
        n = max(1, len(rows))
        lines.append(f"| {signal} ({spec.role}) | {spec.layers} | {stored / n:,.0f} | {raw / n:,.0f} | "
                     f"{raw / max(stored, 1):.1f}x |")
    return "\n".join(lines) + "\n"


def first_layer_heats(model_dir: str, samples) -> list[list]:
    """Per sample, the first decoder layer's text-to-vision heat grids of one model."""
    model = load_model(model_dir).eval()
    enable_capture(model)
    processor = load_processor(model_dir)
    heats = []
    for sample in samples:
        lay = build_layout(sample.record, sample.images, processor)
        with torch.no_grad(), AttentionCapture(model, [0]) as cap:
            model(**lay.model_inputs)
        block = tv_block(cap.maps[0][0], lay.is_vision).numpy()
        heats.append(view_heats(block, lay.summary(), query="answer"))
    return heats


def overlay_section(models: dict[str, str], data: str, out: Path, per_capability: int) -> str:
    chosen, counts = [], {c: 0 for c in CAPABILITIES}
    for sample in iter_samples(data):
        if counts[sample.record.capability] < per_capability:
            counts[sample.record.capability] += 1
            chosen.append(sample)
    heats = {label: first_layer_heats(path, chosen) for label, path in models.items()}
    lines = ["## Attention overlays (layer 0, text-to-vision, answer tokens as queries)\n"]
    for i, sample in enumerate(chosen):
        views = [ref.view or f"image {j}" for j, ref in enumerate(sample.record.images)]
        fig = draw_overlays(sample.images, views, {label: h[i] for label, h in heats.items()},
                            title=f"{sample.key} ({sample.record.capability}): {sample.record.answer[:80]}")
        name = f"overlay_{sample.record.capability}_{sample.key}.png"
        fig.savefig(out / name, dpi=90)
        lines.append(f"**{sample.record.capability}** `{sample.key}`: {sample.record.answer[:120]}\n\n![{name}]({name})\n")
    return "\n".join(lines) + "\n"


def study_section(study_md: str, out_dir: Path) -> str:
    """The study's table (``make study``: every row over seeds), copied from its study.md and linked."""
    path = Path(study_md)
    if not path.is_file():
        raise FileNotFoundError(f"--study {study_md}: no such file (make study writes STUDY_OUT/study.md; the "
                                "committed one is benchmarks/results/study/study.md)")
    text = path.read_text(encoding="utf-8")
    table = [line for line in text.splitlines() if line.startswith("|")]
    if not table:
        raise ValueError(f"--study {study_md}: no table in it (expected the study.md that make study writes)")
    link = Path(os.path.relpath(path.resolve(), out_dir.resolve())).as_posix()
    heading = next((line.lstrip("# ") for line in text.splitlines() if line.startswith("# ")), "")
    return (f"## The study (`make study`)\n\n{heading}: the evidence on which the recommended settings rest, "
            f"from [{path.name}]({link}).\n\n" + "\n".join(table) + "\n")


def write_report(*, out: str, evals: dict[str, str], runs: dict[str, str], cache: str | None,
                 models: dict[str, str], data: str | None, per_capability: int = 2, title: str = "",
                 study: str | None = None) -> Path:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [f"# Drive-KD run report{': ' + title if title else ''}\n"]
    if evals:
        parts.append(score_section(evals))
    if runs:
        metrics = {label: read_metrics(path) for label, path in runs.items()}
        plot_runs(metrics, out_dir / "loss_curves.png")
        parts.append("## Training curves\n\n![loss curves](loss_curves.png)\n\nSources: "
                     + ", ".join(f"`{p}/metrics.jsonl`" for p in runs.values()) + "\n")
        parts += [gradient_section(label, rows) for label, rows in metrics.items()
                  if any(r.get("cos") for r in rows)]
    if study:
        parts.append(study_section(study, out_dir))
    if cache:
        parts.append(cache_section(cache))
    if models and data:
        parts.append(overlay_section(models, data, out_dir, per_capability))
    path = out_dir / "report.md"
    path.write_text("\n".join(parts))
    return path
