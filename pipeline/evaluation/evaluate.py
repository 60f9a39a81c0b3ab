"""Evaluate a driving VLM on a QA set: greedy answers, multiple-choice accuracy, judge scores, Table 1.

    python -m pipeline.evaluate --model models/demo-student --data data/shards --out reports/student
    python -m pipeline.evaluate --model InternVL3-1B --data drivebench.json --image-root /data/nuscenes \\
        --out reports/internvl3-1b --judge http://127.0.0.1:8000/v1 --judge-model deepseek-v3.2
    python -m pipeline.evaluate --efficiency --model models/demo-student --out reports/efficiency.json

`--data` is one of: a shard folder written by `python -m pipeline.ingest` (has manifest.json), a QA JSON
file in the authors' format (schemas.qa), or a DriveBench JSON file in its released layout
(`question_type`, `image_path`, `tag`) or the converted one (`category`, `img_paths`); see
`pipeline.evaluation.drivebench` for tags, camera orders and the prediction yes/no rule. All images go
before the question. All three become `BenchItem`s. `system_prompt` ("drivebench" or a text file) adds a
system turn to every prompt; the default is none (the prompt the model was distilled with).

Each question is answered greedily from the layout builder's prompt (`pipeline.layout.build_prompt`),
batched with left padding. Scoring rules and the scores.json shape are in `pipeline.scoring`.
REPORT_DIR receives config.json (the resolved settings), predictions.jsonl, scores.json, scores.md and,
with --judge, judge_log.jsonl (a re-run with the same answers asks the judge only for what is missing).
`--efficiency` measures deployment metrics instead (`pipeline.efficiency`).
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from pipeline.attention.layout import IMAGE_PLACEHOLDER, build_prompt, collate_inputs
from pipeline.data.ingest import candidate_paths, content_key, describe_errors, load_images
from pipeline.data.shards import iter_samples, read_manifest
from pipeline.evaluation import efficiency
from pipeline.evaluation.choices import is_multiple_choice
from pipeline.evaluation.drivebench import (
    CAMERA_ORDERS,
    YES_NO_POLICIES,
    DriveBenchOptions,
    load_drivebench,
    looks_like_drivebench,
    select_items,
)
from pipeline.evaluation.judge import JudgeClient, JudgeConfig, JudgeItem, JudgeLog, judge_all
from pipeline.evaluation.scoring import (
    Prediction,
    aggregate,
    score_choice,
    write_predictions,
    write_scores,
)
from pipeline.models.load import DTYPES, load_model, resolve_model
from pipeline.models.processors import load_processor
from schemas.qa import LABEL_FIELDS, ImageRef, QARecord, parse_records, unwrap_records

NEEDS_JUDGE = "open-ended: scored only with a judge (--judge URL --judge-model NAME)"
NO_REFERENCE_LETTER = "multiple choice, but the reference answer names no option letter"
DRIVEBENCH_SYSTEM_PROMPT = Path(__file__).parent / "templates" / "drivebench_system.txt"
"""`--system-prompt drivebench`: a DriveBench-style system prompt (an editable file)."""


# ---------------------------------------------------------------- settings


@dataclass
class EvalConfig:
    """One evaluation run. Validated on construction; all problems are reported in one ValueError."""

    model: str
    """Model folder (save_pretrained layout) or a known name looked up under $MODEL_DIR."""
    data: str
    """Shard folder (manifest.json), authors' QA JSON file, or DriveBench JSON file."""
    out: str
    """Report folder (created)."""
    image_root: str | None = None
    """Folder the JSON inputs' image paths are relative to; default: the JSON file's folder."""
    judge_url: str | None = None
    """OpenAI-compatible endpoint of the judge for open-ended answers; None: they stay unscored."""
    judge_model: str | None = None
    """Judge model name; required with judge_url."""
    judge_workers: int = 4
    """Concurrent judge requests."""
    max_new_tokens: int = 128
    batch_size: int = 4
    """Questions answered per generate call."""
    limit: int | None = None
    """Answer only the first `limit` questions."""
    name: str | None = None
    """Label of the run in the tables; default: the model folder's name."""
    device: str | None = None
    """cpu, cuda or cuda:N; default cuda when available."""
    dtype: str | None = None
    """bf16, fp16 or fp32; default bf16 on cuda, fp32 on cpu."""
    camera_order: str = "nuscenes"
    """DriveBench input: "nuscenes" (Drive-KD's training order) or "drivebench" (FRONT, FRONT_LEFT, ...)."""
    prediction_yes_no: str = "skip"
    """DriveBench input: "skip" prediction yes/no questions (as DriveBench does) or "judge" them."""
    map_category: list[str] = dataclasses.field(default_factory=list)
    """DriveBench input: extra CATEGORY=CAPABILITY mappings, e.g. ["robust_qas=perception"]."""
    system_prompt: str | None = None
    """None (default: no system turn), "drivebench" (`DRIVEBENCH_SYSTEM_PROMPT`) or a text file."""

    def __post_init__(self) -> None:
        problems = [*self._drivebench_problems()]
        for field in ("judge_workers", "max_new_tokens", "batch_size"):
            if getattr(self, field) < 1:
                problems.append(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.limit is not None and self.limit < 1:
            problems.append(f"limit must be >= 1, got {self.limit}")
        if (self.judge_url is None) != (self.judge_model is None):
            problems.append("judge_url and judge_model go together: pass both --judge URL and --judge-model NAME")
        elif self.judge_url is not None:
            try:
                JudgeConfig(url=self.judge_url, model=self.judge_model)  # fail before hours of generation
            except ValueError as err:
                problems.append(str(err))
        if self.dtype is not None and self.dtype not in DTYPES:
            problems.append(f"dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        device_problem = efficiency.device_problem(self.device)
        if device_problem:
            problems.append(device_problem)
        if problems:
            raise ValueError("invalid evaluation settings:\n  " + "\n  ".join(problems))
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = self.dtype or ("bf16" if self.device.startswith("cuda") else "fp32")

    def _drivebench_problems(self) -> list[str]:
        problems = []
        if self.camera_order not in CAMERA_ORDERS:
            problems.append(f"camera_order {self.camera_order!r} is not one of {sorted(CAMERA_ORDERS)}")
        if self.prediction_yes_no not in YES_NO_POLICIES:
            problems.append(f"prediction_yes_no {self.prediction_yes_no!r} is not one of {list(YES_NO_POLICIES)}")
        bad = [item for item in self.map_category if item.count("=") != 1 or not all(item.split("="))]
        if bad:
            problems.append(f"map_category {bad}: write CATEGORY=CAPABILITY, e.g. robust_qas=perception")
        else:
            try:
                self.drivebench_options()
            except ValueError as err:
                problems.append(str(err))
        if self.system_prompt not in (None, "drivebench") and not Path(self.system_prompt).is_file():
            problems.append(f"system_prompt {self.system_prompt!r} is neither 'drivebench' nor a text file")
        return problems

    def drivebench_options(self) -> DriveBenchOptions:
        mapping = dict(item.split("=") for item in self.map_category)
        return DriveBenchOptions(camera_order=self.camera_order, prediction_yes_no=self.prediction_yes_no,
                                 extra_categories={k.strip().lower(): v.strip() for k, v in mapping.items()})

    def system_text(self) -> str | None:
        """The system turn's text, or None."""
        if self.system_prompt is None:
            return None
        path = DRIVEBENCH_SYSTEM_PROMPT if self.system_prompt == "drivebench" else Path(self.system_prompt)
        return path.read_text(encoding="utf-8").strip()


# ---------------------------------------------------------------- data


@dataclass
class BenchItem:
    """One question of any input format, ready to be answered."""

    key: str
    capability: str
    question: str
    """Question text with one <image> placeholder per image."""
    reference: str
    images: list[Image.Image]
    multiple_choice: bool
    source_category: str
    """The data's own label: DriveBench category, the QA file's label, or the capability (shards)."""


@dataclass
class BenchData:
    """The items of one input (read lazily, images decoded as they come) and what to record about it."""

    format: str
    """"shards", "qa_json" or "drivebench"."""
    total: int
    items: Iterator[BenchItem]
    category_map: dict[str, str] | None = None
    """DriveBench category -> capability, only for DriveBench input."""
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    """How the input was read (DriveBench: options and what was left out), recorded in the report."""


def _open_image(raw: str, image_root: Path, where: str) -> Image.Image:
    candidates = candidate_paths(raw, image_root)
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"{where}: image {raw!r} not found (tried {candidates[0]} and shorter paths under "
                                f"{image_root}). Fix: pass --image-root DIR, the folder the image paths are relative to.")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as err:
        raise ValueError(f"{where}: {path} is not a readable image ({err}). Fix: replace the file.") from err


def _shard_data(path: str) -> BenchData:
    def items() -> Iterator[BenchItem]:
        for sample in iter_samples(path):
            record = sample.record
            yield BenchItem(key=sample.key, capability=record.capability, question=record.question,
                            reference=record.answer, images=sample.images,
                            multiple_choice=is_multiple_choice(record.question), source_category=record.capability)

    return BenchData(format="shards", total=read_manifest(path).num_samples, items=items())


def _qa_json_data(path: Path, obj: Any, image_root: Path) -> BenchData:
    parsed = parse_records(obj, source=path.name)
    if parsed.errors:
        raise ValueError(describe_errors(parsed.errors, total=parsed.total, source=str(path)))
    raw = unwrap_records(obj, source=path.name)

    def items() -> Iterator[BenchItem]:
        seen: Counter[str] = Counter()
        for record in parsed.records:
            loaded = load_images(record, image_root)
            base = content_key(record, [data for data, _ in loaded])  # the key ingest gives the same record
            key = f"{base}-{seen[base]}" if seen[base] else base
            seen[base] += 1
            label = next(raw[record.index][name] for name in LABEL_FIELDS if name in raw[record.index])
            yield BenchItem(key=key, capability=record.capability, question=record.question, reference=record.answer,
                            images=[Image.open(io.BytesIO(data)).convert("RGB") for data, _ in loaded],
                            multiple_choice=is_multiple_choice(record.question),
                            source_category=label.strip().lower())

    return BenchData(format="qa_json", total=len(parsed.records), items=items())


def _drivebench_data(path: Path, image_root: Path, options: DriveBenchOptions) -> BenchData:
    records, left_out = select_items(load_drivebench(path, options=options), options)

    def items() -> Iterator[BenchItem]:
        for item in records:
            images = [_open_image(raw, image_root, f"{path} item {item.key}, camera {view}")
                      for raw, view in zip(item.images, item.views)]
            yield BenchItem(key=item.key, capability=item.capability,
                            question=f"{IMAGE_PLACEHOLDER}\n" * len(images) + item.question, reference=item.answer,
                            images=images, multiple_choice=item.multiple_choice, source_category=item.source_category)

    settings = {**options.describe(), "left_out": left_out}
    return BenchData(format="drivebench", total=len(records), items=items(), category_map=options.category_map,
                     settings=settings)


def open_data(data: str, image_root: str | None = None, options: DriveBenchOptions | None = None) -> BenchData:
    """Detect the format of `data` (shard folder or URL, authors' QA JSON, DriveBench JSON) and read it."""
    path = Path(data)
    if "://" in data or path.is_dir():
        return _shard_data(data)
    if not path.is_file():
        raise FileNotFoundError(f"--data {data} does not exist. Fix: pass a shard folder written by "
                                "`python -m pipeline.ingest`, an authors' QA JSON file, or a DriveBench JSON file.")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid UTF-8 JSON ({err}). Fix: repair or re-export the file.") from err
    root = Path(image_root) if image_root is not None else path.parent
    if looks_like_drivebench(obj):
        return _drivebench_data(path, root, options or DriveBenchOptions())
    return _qa_json_data(path, obj, root)


# ---------------------------------------------------------------- answering and scoring


def _prompt_record(item: BenchItem) -> QARecord:
    refs = tuple(ImageRef(view=None, file="", source_path=f"image{i}") for i in range(len(item.images)))
    return QARecord(key=item.key, capability=item.capability, images=refs, question=item.question,
                    answer=item.reference, source="evaluate", index=0)


def generate_answers(model, processor, items: list[BenchItem], *, max_new_tokens: int,
                     system: str | None = None) -> list[str]:
    """Greedy answers to a batch of items (left-padded prompts, one generate call; optional system turn)."""
    tokenizer = processor.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = [build_prompt(_prompt_record(item), item.images, processor, system=system) for item in items]
    batch = efficiency.to_device(collate_inputs(prompts, pad_id), model.device, model.dtype)
    with torch.inference_mode():
        output = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad_id)
    texts = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return [text.strip() for text in texts]


def score_item(item: BenchItem, answer: str) -> Prediction:
    """The prediction row of one answer; multiple choice is scored here, open-ended waits for the judge."""
    fields = dict(key=item.key, capability=item.capability, source_category=item.source_category,
                  question=item.question, reference=item.reference, prediction=answer,
                  multiple_choice=item.multiple_choice)
    if not item.multiple_choice:
        return Prediction(**fields, note=NEEDS_JUDGE)
    outcome = score_choice(item.question, item.reference, answer)
    if outcome.correct is None:
        return Prediction(**fields, choice=outcome.choice, note=NO_REFERENCE_LETTER)
    return Prediction(**fields, choice=outcome.choice, reference_choice=outcome.reference_choice,
                      correct=outcome.correct, score=100.0 if outcome.correct else 0.0, scored_by="choice")


def _batches(items: Iterator[BenchItem], size: int) -> Iterator[list[BenchItem]]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def answer_all(config: EvalConfig, model_dir: Path, data: BenchData) -> list[Prediction]:
    """Answer and (multiple choice) score every item of `data`, with a progress bar."""
    processor = load_processor(model_dir)
    model = load_model(model_dir, dtype=config.dtype).to(config.device).eval()
    total = data.total if config.limit is None else min(data.total, config.limit)
    predictions, system = [], config.system_text()
    with tqdm(total=total, desc="answering", unit="question") as bar:
        for chunk in _batches(itertools.islice(data.items, total), config.batch_size):
            answers = generate_answers(model, processor, chunk, max_new_tokens=config.max_new_tokens, system=system)
            predictions += [score_item(item, answer) for item, answer in zip(chunk, answers)]
            bar.update(len(chunk))
    return predictions


def _without_images(question: str) -> str:
    return question.replace(f"{IMAGE_PLACEHOLDER}\n", "").replace(IMAGE_PLACEHOLDER, "").strip()


def judge_open_ended(predictions: list[Prediction], config: EvalConfig, log_path: Path) -> list[Prediction]:
    """Predictions with the open-ended ones scored by the judge (text only: image placeholders removed)."""
    open_ended = [p for p in predictions if not p.multiple_choice]
    if config.judge_url is None or not open_ended:
        return predictions
    client = JudgeClient(JudgeConfig(url=config.judge_url, model=config.judge_model))
    items = [JudgeItem(key=p.key, capability=p.capability, question=_without_images(p.question),
                       reference=p.reference, prediction=p.prediction, category=p.source_category) for p in open_ended]
    results = judge_all(client, items, JudgeLog(log_path), workers=config.judge_workers)
    return [p if p.multiple_choice else dataclasses.replace(
        p, score=results[p.key].score, scored_by=None if results[p.key].score is None else "judge",
        note=results[p.key].error) for p in predictions]


# ---------------------------------------------------------------- run


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Answer, score and report one model on one QA set; returns the scores.json content."""
    model_dir = resolve_model(config.model)
    data = open_data(config.data, config.image_root, config.drivebench_options())
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    run = {**dataclasses.asdict(config), "model_dir": str(model_dir), "data_format": data.format,
           "data_settings": data.settings, "system_text": config.system_text()}
    (out / "config.json").write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")

    predictions = answer_all(config, model_dir, data)
    write_predictions(predictions, out / "predictions.jsonl")  # kept if the judge fails
    predictions = judge_open_ended(predictions, config, out / "judge_log.jsonl")
    write_predictions(predictions, out / "predictions.jsonl")

    scores = aggregate(predictions, model=str(model_dir), label=config.name or model_dir.name,
                       category_map=data.category_map, run=run)
    write_scores(scores, out)
    return scores
