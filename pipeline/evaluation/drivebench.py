"""DriveBench records -> evaluation items with one Drive-KD capability each.

Two layouts are read as they are:

- the released one (worldbench/DriveBench, data set drive-bench/arena): a JSON list of records with
  `scene_token`, `frame_token`, `question_type` (perception / prediction / planning / behavior),
  `question`, `answer`, `tag` and `image_path` (camera name -> path);
- the converted one of a later release: the same with `category` and `img_paths` instead.

`tag` has DriveBench's semantics (`DRIVEBENCH_TAGS`): 0 multiple choice (scored by the option letter),
1 / 2 / 3 open-ended planning / perception / prediction answers (scored by the judge). Without a tag
an item is multiple choice when its question lists lettered options. DriveBench leaves prediction
yes/no questions out of its scores; `DriveBenchOptions.prediction_yes_no` keeps that ("skip", the
default) or sends them to the judge ("judge"). Categories map to capabilities by
`DRIVEBENCH_CATEGORY_MAP`; others (`robust_qas` of the corruption sets) need `--map-category`.
Image order: `NUSCENES_CAMERAS` (the order Drive-KD trains with, the default) or `DRIVEBENCH_CAMERAS`
(DriveBench's own, for a like-for-like run). Image paths are not checked here; the runner opens them.

Checked against the public DriveBench repository (worldbench/DriveBench): `prompt.txt` is its system
prompt (templates/drivebench_system.txt holds it unchanged) and names the cameras in `DRIVEBENCH_CAMERAS`
order; its inference script passes a record's images in the order of its `image_path` object (the released
records list them in that order) and resizes them to its model's input; its judge (`evaluate/request.py`)
reads the first `Total Score: N` of a reply, as `pipeline.evaluation.judge.parse_score` does. The
judge rubrics under templates/ are our own.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.evaluation.choices import is_multiple_choice
from schemas.method import CAPABILITIES

logger = logging.getLogger(__name__)

DRIVEBENCH_CATEGORY_MAP: dict[str, str] = {
    "perception": "perception",
    "prediction": "reasoning",
    "planning": "planning",
    "behavior": "planning",
}
"""DriveBench category (lower case) -> Drive-KD capability, as in the Drive-KD paper's evaluation."""

CATEGORY_ALIASES: dict[str, str] = {"behaviour": "behavior"}
"""Spellings accepted for a category besides the keys of `DRIVEBENCH_CATEGORY_MAP`."""

NUSCENES_CAMERAS: tuple[str, ...] = (
    "CAM_FRONT_LEFT",
    "CAM_FRONT",
    "CAM_FRONT_RIGHT",
    "CAM_BACK_LEFT",
    "CAM_BACK_RIGHT",
    "CAM_BACK",
)
"""Order of the images of an item (the surround order Drive-KD trains with)."""

DRIVEBENCH_CAMERAS: tuple[str, ...] = (
    "CAM_FRONT",
    "CAM_FRONT_LEFT",
    "CAM_FRONT_RIGHT",
    "CAM_BACK",
    "CAM_BACK_LEFT",
    "CAM_BACK_RIGHT",
)
"""DriveBench's camera order (its prompts name the views in this order)."""

CAMERA_ORDERS: dict[str, tuple[str, ...]] = {"nuscenes": NUSCENES_CAMERAS, "drivebench": DRIVEBENCH_CAMERAS}

DRIVEBENCH_TAGS: dict[int, str] = {
    0: "multiple choice",
    1: "planning, open-ended",
    2: "perception, open-ended",
    3: "prediction, open-ended",
}
"""DriveBench's `tag` values: 0 is scored by the option letter, the others by the judge."""

YES_NO_POLICIES = ("skip", "judge")

ID_FIELDS: tuple[str, ...] = ("id", "question_id", "sample_id")
"""Record fields taken, in this order, as the item key when present; else the key is a content hash."""


@dataclass(frozen=True)
class DriveBenchOptions:
    """How DriveBench records become items. Validated on construction."""

    camera_order: str = "nuscenes"
    """"nuscenes" (Drive-KD's training order) or "drivebench" (DriveBench's own)."""
    prediction_yes_no: str = "skip"
    """"skip": leave prediction yes/no questions out, as DriveBench does; "judge": score them."""
    extra_categories: dict[str, str] = field(default_factory=dict)
    """Further category (lower case) -> capability, e.g. {"robust_qas": "perception"}."""

    def __post_init__(self) -> None:
        problems = []
        if self.camera_order not in CAMERA_ORDERS:
            problems.append(f"camera_order {self.camera_order!r} is not one of {sorted(CAMERA_ORDERS)}")
        if self.prediction_yes_no not in YES_NO_POLICIES:
            problems.append(f"prediction_yes_no {self.prediction_yes_no!r} is not one of {list(YES_NO_POLICIES)}")
        for category, capability in self.extra_categories.items():
            if capability not in CAPABILITIES:
                problems.append(f"--map-category {category}={capability}: {capability!r} is not one of {CAPABILITIES}")
        if problems:
            raise ValueError("invalid DriveBench options:\n  " + "\n  ".join(problems))

    @property
    def category_map(self) -> dict[str, str]:
        return {**DRIVEBENCH_CATEGORY_MAP, **{k.lower(): v for k, v in self.extra_categories.items()}}

    def describe(self) -> dict[str, Any]:
        """The settings as recorded in the report."""
        return {"camera_order": list(CAMERA_ORDERS[self.camera_order]), "prediction_yes_no": self.prediction_yes_no,
                "tags": {str(tag): meaning for tag, meaning in DRIVEBENCH_TAGS.items()},
                "category_map": self.category_map}


@dataclass(frozen=True)
class EvalItem:
    """One benchmark question, ready for a model to answer and a judge to score."""

    key: str
    """Stable identifier: the record's id field, else 16 hex digits of a sha256 of its content."""
    capability: str
    """perception, reasoning or planning."""
    question: str
    answer: str
    """Reference answer."""
    images: list[str]
    """Image paths in the chosen camera order, only the cameras the record has."""
    views: list[str]
    """Camera name of each entry of `images`."""
    source_category: str
    """The record's category, normalised to lower case ("behaviour" -> "behavior")."""
    multiple_choice: bool
    """Tag 0, or without a tag: the question lists lettered options (`pipeline.evaluation.choices`)."""
    tag: int | None = None
    """DriveBench's tag (`DRIVEBENCH_TAGS`), None when the record has none."""


def looks_like_drivebench(obj: Any) -> bool:
    """True for a DriveBench record (either layout), or a list whose first record is one."""
    record = obj[0] if isinstance(obj, list) and obj else obj
    if not isinstance(record, dict) or "question" not in record:
        return False
    return ("category" in record and "img_paths" in record) or ("question_type" in record and "image_path" in record)


def is_yes_no(item: EvalItem) -> bool:
    """A prediction question whose reference answer is a plain yes or no (DriveBench leaves these out)."""
    words = item.answer.strip().lower().replace(",", " ").replace(".", " ").split()
    return item.source_category == "prediction" and not item.multiple_choice and bool(words) and words[0] in ("yes", "no")


def select_items(items: list[EvalItem], options: DriveBenchOptions) -> tuple[list[EvalItem], dict[str, int]]:
    """(items to evaluate, {reason: count} of those left out) under `options`."""
    if options.prediction_yes_no == "judge":
        return items, {}
    kept = [item for item in items if not is_yes_no(item)]
    left_out = len(items) - len(kept)
    return kept, ({"prediction yes/no (DriveBench leaves these out)": left_out} if left_out else {})


def load_drivebench(path: str | Path, image_root: str | Path | None = None,
                    options: DriveBenchOptions | None = None) -> list[EvalItem]:
    """Read a DriveBench JSON file (either layout) into `EvalItem`s, in file order.

    Relative image paths are joined to `image_root` when given (absolute ones are kept). Records
    without an id field that are exact duplicates get keys suffixed "-1", "-2", ... in file order.
    Raises ValueError naming the record index and field for any malformed record.
    """
    path = Path(path)
    options = options or DriveBenchOptions()
    if not path.is_file():
        raise FileNotFoundError(f"DriveBench file {path} does not exist")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of DriveBench records, found {type(records).__name__}")
    root = Path(image_root) if image_root is not None else None
    items = [_item_from_record(record, index, root, path, options) for index, record in enumerate(records)]
    return _unique_keys(items, records, path)


def _field_names(record: dict[str, Any]) -> tuple[str, str]:
    """(category field, image field) of a record: the released layout's or the converted one's."""
    category = "question_type" if "question_type" in record else "category"
    images = "image_path" if "image_path" in record else "img_paths"
    return category, images


def _category(record: dict[str, Any], field_name: str, where: str, options: DriveBenchOptions) -> str:
    category = record[field_name].strip().lower()
    category = CATEGORY_ALIASES.get(category, category)
    if category not in options.category_map:
        known = sorted([*options.category_map, *CATEGORY_ALIASES])
        raise ValueError(
            f"{where}: field '{field_name}' is {record[field_name]!r}; expected one of {known}. Fix: map it to a "
            f"capability with `--map-category {category}=perception` (or reasoning / planning), or leave such "
            "records out of the file"
        )
    return category


def _tag(value: Any, where: str) -> int | None:
    """DriveBench's tag: an integer, or a list of them (DriveLM style: the first counts); None if absent."""
    tag = value[0] if isinstance(value, list) and value else value
    if tag is None or (isinstance(value, list) and not value):
        return None
    if isinstance(tag, bool) or not isinstance(tag, int) or tag not in DRIVEBENCH_TAGS:
        raise ValueError(f"{where}: field 'tag' is {value!r}; expected one of {sorted(DRIVEBENCH_TAGS)} "
                         f"({', '.join(f'{k} {v}' for k, v in DRIVEBENCH_TAGS.items())})")
    return tag


def _item_from_record(record: Any, index: int, root: Path | None, path: Path, options: DriveBenchOptions) -> EvalItem:
    where = f"{path} record {index}"
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object, found {type(record).__name__}")
    category_field, image_field = _field_names(record)
    for name in ("question", "answer", category_field):
        if not isinstance(record.get(name), str):
            raise ValueError(f"{where}: field '{name}' must be a string, found {record.get(name)!r}")
    question = record["question"].strip()
    if not question:
        raise ValueError(f"{where}: field 'question' is empty")
    category = _category(record, category_field, where, options)
    views, images = _ordered_images(record.get(image_field), image_field, where, root, CAMERA_ORDERS[options.camera_order])
    tag = _tag(record.get("tag"), where)
    return EvalItem(
        key=_record_key(record, where),
        capability=options.category_map[category],
        question=question,
        answer=record["answer"].strip(),
        images=images,
        views=views,
        source_category=category,
        multiple_choice=tag == 0 if tag is not None else is_multiple_choice(question),
        tag=tag,
    )


def _ordered_images(paths: Any, name: str, where: str, root: Path | None,
                    order: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(camera names, image paths) in `order` from a record's camera -> path object `paths`."""
    if not isinstance(paths, dict) or not paths:
        raise ValueError(f"{where}: field '{name}' must be a non-empty object camera name -> path, found {paths!r}")
    unknown = sorted(set(paths) - set(order))
    if unknown:
        raise ValueError(f"{where}: field '{name}' has unknown cameras {unknown}; known: {list(order)}")
    views, images = [], []
    for camera in order:
        if camera not in paths:
            continue
        image = paths[camera]
        if not isinstance(image, str) or not image.strip():
            raise ValueError(f"{where}: field '{name}.{camera}' must be a non-empty path, found {image!r}")
        views.append(camera)
        images.append(str(root / image) if root is not None and not Path(image).is_absolute() else image)
    return views, images


def _record_key(record: dict[str, Any], where: str) -> str:
    for name in ID_FIELDS:
        if name in record:
            value = record[name]
            if not isinstance(value, (str, int)) or isinstance(value, bool) or str(value).strip() == "":
                raise ValueError(f"{where}: id field '{name}' must be a non-empty string or integer, found {value!r}")
            return str(value).strip()
    content = {
        name: record.get(name)
        for name in ("scene_token", "frame_token", "category", "question_type", "question", "answer", "img_paths",
                     "image_path")
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _unique_keys(items: list[EvalItem], records: list[dict[str, Any]], path: Path) -> list[EvalItem]:
    """Suffix repeated content-hash keys; repeated id-field keys are an error."""
    seen: Counter[str] = Counter()
    first_index: dict[str, int] = {}
    unique = []
    for index, (item, record) in enumerate(zip(items, records)):
        count = seen[item.key]
        seen[item.key] += 1
        if count == 0:
            first_index[item.key] = index
            unique.append(item)
            continue
        if any(field in record for field in ID_FIELDS):
            raise ValueError(
                f"{path} record {index}: id {item.key!r} repeats record {first_index[item.key]}; ids must be unique"
            )
        unique.append(replace(item, key=f"{item.key}-{count}"))
    duplicates = sum(count - 1 for count in seen.values())
    if duplicates:
        logger.warning("%s: %d duplicate records got suffixed keys", path, duplicates)
    return unique
