"""Scores of an evaluation run: per-item scoring rules, per-capability aggregation, the Table-1 layout.

Every answered question becomes one `Prediction` (one line of ``predictions.jsonl``). Its ``score`` is
the number that counts towards its capability:

- multiple choice: 100 when the option letter read from the prediction equals the one read from the
  reference (`pipeline.choices.extract_choice` over the question's own options), else 0; a
  prediction naming no letter (or several) is wrong. A reference naming no letter cannot be scored
  and stays unscored, with the reason in ``note``;
- open-ended: the judge's score (0-100) when a judge was used and answered, else unscored.

A capability's score is the mean over its scored items; unscored items are left out and counted.
The run's average is the mean over the capabilities that have a score (the paper's "Avg.").

scores.json (version 1)::

    {"format": "drive-kd/eval-scores", "version": 1, "model": "...", "label": "...",
     "capabilities": {"perception": {"n", "n_mc", "n_mc_scored", "mc_accuracy", "n_open",
                                     "n_open_scored", "open_score", "n_scored", "n_unscored", "score"},
                      "reasoning": {...}, "planning": {...}},
     "average": 44.05, "average_over": ["perception", "reasoning", "planning"],
     "table": {"Perception": 43.5, "Reasoning": 33.15, "Planning": 55.51, "Avg.": 44.05},
     "category_map": {"prediction": "reasoning", ...},  "source_categories": {"prediction": {...}, ...},
     "run": {...}}

All accuracies and scores are percentages (0-100), unrounded, or null when nothing was scored; every
capability appears, with n = 0 when the data had none. ``category_map`` and ``source_categories``
(the same statistics per DriveBench category) are present only when DriveBench was read; ``run``
holds the resolved evaluation settings.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.evaluation.choices import extract_choice, parse_options
from schemas.method import CAPABILITIES

SCORES_FORMAT = "drive-kd/eval-scores"
SCORES_VERSION = 1
PREDICTIONS_VERSION = 1
SCORES_NAME = "scores.json"
TABLE_COLUMNS = {"perception": "Perception", "reasoning": "Reasoning", "planning": "Planning"}
AVERAGE_COLUMN = "Avg."
SCORED_BY = ("choice", "judge")
_RERUN = "re-run `python -m pipeline.evaluate` with this version of the code"


@dataclass(frozen=True)
class ChoiceOutcome:
    """How one multiple-choice answer scored."""

    choice: str | None
    """Letter read from the prediction (None: none or several)."""
    reference_choice: str | None
    """Letter read from the reference answer (None: the item cannot be scored)."""
    correct: bool | None
    """choice == reference_choice; None when reference_choice is None."""


def score_choice(question: str, reference: str, prediction: str) -> ChoiceOutcome:
    """Read the option letters of prediction and reference against the question's options and compare."""
    options = parse_options(question)
    choice = extract_choice(prediction, options)
    reference_choice = extract_choice(reference, options)
    correct = None if reference_choice is None else choice == reference_choice
    return ChoiceOutcome(choice=choice, reference_choice=reference_choice, correct=correct)


@dataclass
class Prediction:
    """One answered question: a line of predictions.jsonl."""

    key: str
    capability: str
    """perception, reasoning or planning."""
    source_category: str
    """The data's own label (DriveBench category, the QA file's question_type, or the capability)."""
    question: str
    """Question as the model saw it, <image> placeholders included."""
    reference: str
    prediction: str
    multiple_choice: bool
    choice: str | None = None
    """Multiple choice: the letter read from the prediction."""
    reference_choice: str | None = None
    """Multiple choice: the letter read from the reference."""
    correct: bool | None = None
    """Multiple choice: whether the letters agree (None when unscored)."""
    score: float | None = None
    """0-100, counted towards the capability; None = unscored."""
    scored_by: str | None = None
    """"choice", "judge", or None when unscored."""
    note: str | None = None
    """Why the item is unscored (or the judge's error), else None."""

    def __post_init__(self) -> None:
        problems = []
        if self.capability not in CAPABILITIES:
            problems.append(f"capability {self.capability!r} is not one of {CAPABILITIES}")
        if self.score is not None and not 0.0 <= self.score <= 100.0:
            problems.append(f"score {self.score!r} is outside 0-100")
        if (self.score is None) != (self.scored_by is None) or self.scored_by not in (None, *SCORED_BY):
            problems.append(f"scored_by {self.scored_by!r} does not fit score {self.score!r}")
        if self.scored_by == "choice" and (not self.multiple_choice or self.correct is None
                                           or self.score != (100.0 if self.correct else 0.0)):
            problems.append(f"a choice score must be 100 (correct) or 0 (wrong) on a multiple-choice item, "
                            f"got score {self.score!r} with correct={self.correct!r}")
        if problems:
            raise ValueError(f"prediction {self.key!r}: " + "; ".join(problems))

    def to_json(self) -> dict[str, Any]:
        return {"version": PREDICTIONS_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: Any, *, where: str) -> Prediction:
        """Read a to_json line; `where` names the file and line in errors."""
        if not isinstance(data, dict) or data.get("version") != PREDICTIONS_VERSION:
            found = data.get("version") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{where}: prediction version {found!r}, this code reads version "
                             f"{PREDICTIONS_VERSION}. Fix: {_RERUN}.")
        fields = {name: value for name, value in data.items() if name != "version"}
        try:
            return cls(**fields)
        except TypeError as err:
            raise ValueError(f"{where}: malformed prediction ({err}). Fix: {_RERUN}.") from err


def write_predictions(predictions: Iterable[Prediction], path: str | Path) -> None:
    """One JSON line per prediction, in order."""
    lines = [json.dumps(p.to_json(), ensure_ascii=False) + "\n" for p in predictions]
    Path(path).write_text("".join(lines), encoding="utf-8")


def read_predictions(path: str | Path) -> list[Prediction]:
    """The predictions of a predictions.jsonl file, in order."""
    path = Path(path)
    predictions = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            where = f"{path} line {number}"
            try:
                data = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not JSON ({err}). Fix: {_RERUN}.") from err
            predictions.append(Prediction.from_json(data, where=where))
    return predictions


def _mean(values: list[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def group_stats(predictions: list[Prediction]) -> dict[str, Any]:
    """Counts, multiple-choice accuracy, mean judge score and overall score (%) of one group of items."""
    mc = [p for p in predictions if p.multiple_choice]
    open_ended = [p for p in predictions if not p.multiple_choice]
    mc_scores = [p.score for p in mc if p.score is not None]
    open_scores = [p.score for p in open_ended if p.score is not None]
    return {
        "n": len(predictions),
        "n_mc": len(mc),
        "n_mc_scored": len(mc_scores),
        "mc_accuracy": _mean(mc_scores),
        "n_open": len(open_ended),
        "n_open_scored": len(open_scores),
        "open_score": _mean(open_scores),
        "n_scored": len(mc_scores) + len(open_scores),
        "n_unscored": len(predictions) - len(mc_scores) - len(open_scores),
        "score": _mean(mc_scores + open_scores),
    }


def aggregate(predictions: list[Prediction], *, model: str, label: str,
              category_map: dict[str, str] | None = None, run: dict[str, Any] | None = None) -> dict[str, Any]:
    """scores.json content for a run (see the module docstring); `category_map` only for DriveBench."""
    capabilities = {c: group_stats([p for p in predictions if p.capability == c]) for c in CAPABILITIES}
    average_over = [c for c in CAPABILITIES if capabilities[c]["score"] is not None]
    average = _mean([capabilities[c]["score"] for c in average_over])
    table = {TABLE_COLUMNS[c]: capabilities[c]["score"] for c in CAPABILITIES}
    scores: dict[str, Any] = {
        "format": SCORES_FORMAT, "version": SCORES_VERSION, "model": model, "label": label,
        "capabilities": capabilities, "average": average, "average_over": average_over,
        "table": {**table, AVERAGE_COLUMN: average},
    }
    if category_map is not None:
        categories = sorted({p.source_category for p in predictions} | set(category_map))
        scores["category_map"] = dict(category_map)
        scores["source_categories"] = {
            name: group_stats([p for p in predictions if p.source_category == name]) for name in categories}
    scores["run"] = dict(run or {})
    return scores


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def render_table(runs: list[dict[str, Any]]) -> str:
    """Markdown table in the paper's Table 1 layout, one row per scores.json content."""
    columns = [*TABLE_COLUMNS.values(), AVERAGE_COLUMN]
    lines = ["| Model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += ["| " + " | ".join([scores["label"], *(_cell(scores["table"][c]) for c in columns)]) + " |"
              for scores in runs]
    return "\n".join(lines) + "\n"


def render_markdown(scores: dict[str, Any]) -> str:
    """scores.md: the Table-1 row, then counts per capability (and per DriveBench category)."""
    parts = [f"# Evaluation: {scores['label']}\n\nModel: `{scores['model']}`\n\n", render_table([scores])]
    if scores["average_over"] and len(scores["average_over"]) < len(CAPABILITIES):
        parts.append(f"\nAvg. is over {', '.join(scores['average_over'])} only (the others have no scored items).\n")
    groups = [("Capability", scores["capabilities"])]
    if "source_categories" in scores:
        groups.append(("DriveBench category", scores["source_categories"]))
    for title, stats in groups:
        parts.append(f"\n| {title} | n | MC | MC acc. | open | open scored | open score | unscored | score |\n"
                     "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
        parts += [f"| {name} | {s['n']} | {s['n_mc']} | {_cell(s['mc_accuracy'])} | {s['n_open']} | "
                  f"{s['n_open_scored']} | {_cell(s['open_score'])} | {s['n_unscored']} | {_cell(s['score'])} |\n"
                  for name, s in stats.items()]
    if "category_map" in scores:
        mapping = ", ".join(f"{k} -> {v}" for k, v in scores["category_map"].items())
        parts.append(f"\nDriveBench categories mapped to capabilities: {mapping}.\n")
    unscored = sum(s["n_unscored"] for s in scores["capabilities"].values())
    if unscored:
        parts.append(f"\n{unscored} items are unscored (open-ended without a judge, or no reference letter); "
                     "they are excluded from the scores.\n")
    return "".join(parts)


def write_scores(scores: dict[str, Any], report_dir: str | Path) -> None:
    """scores.json and scores.md into `report_dir`."""
    report_dir = Path(report_dir)
    (report_dir / SCORES_NAME).write_text(json.dumps(scores, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (report_dir / "scores.md").write_text(render_markdown(scores), encoding="utf-8")


def load_scores(path: str | Path) -> dict[str, Any]:
    """scores.json content from the file or the report folder holding it; refuses other formats/versions."""
    path = Path(path)
    if path.is_dir():
        path = path / SCORES_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found. Fix: run `python -m pipeline.evaluate --out DIR ...` first "
                                "and pass DIR or DIR/scores.json.")
    try:
        scores = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON ({err}). Fix: {_RERUN}.") from err
    if not isinstance(scores, dict) or scores.get("format") != SCORES_FORMAT:
        raise ValueError(f"{path}: not a {SCORES_FORMAT} file. Fix: pass the scores.json of an evaluation run.")
    if scores.get("version") != SCORES_VERSION:
        raise ValueError(f"{path}: scores version {scores.get('version')!r}, this code reads version "
                         f"{SCORES_VERSION}. Fix: {_RERUN}.")
    return scores
