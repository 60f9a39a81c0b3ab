"""DriveBench records -> evaluation items with one Drive-KD capability each.

DriveBench (ICCV 2025) ships a JSON list of question records about nuScenes frames:
`question`, `answer`, `category` (perception / prediction / planning / behavior), `img_paths`
(camera name -> image path) and extra fields (`scene_token`, `frame_token`, `tag`, ...) that are
kept out of the item. Categories map to the three capabilities by `DRIVEBENCH_CATEGORY_MAP`.
Image paths are not checked for existence here; the model runner opens them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.evaluation.choices import is_multiple_choice

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

ID_FIELDS: tuple[str, ...] = ("id", "question_id", "sample_id")
"""Record fields taken, in this order, as the item key when present; else the key is a content hash."""


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
    """Image paths in `NUSCENES_CAMERAS` order, only the cameras the record has."""
    views: list[str]
    """Camera name of each entry of `images`."""
    source_category: str
    """The record's category, normalised to lower case ("behaviour" -> "behavior")."""
    multiple_choice: bool
    """The question lists lettered options (see `pipeline.choices.parse_options`)."""


def looks_like_drivebench(obj: Any) -> bool:
    """True for a DriveBench record, or a list whose first record has `category` and `img_paths`."""
    record = obj[0] if isinstance(obj, list) and obj else obj
    return isinstance(record, dict) and "category" in record and "img_paths" in record


def load_drivebench(path: str | Path, image_root: str | Path | None = None) -> list[EvalItem]:
    """Read a DriveBench JSON file into `EvalItem`s, in file order.

    Relative image paths are joined to `image_root` when given (absolute ones are kept). Records
    without an id field that are exact duplicates get keys suffixed "-1", "-2", ... in file order.
    Raises ValueError naming the record index and field for any malformed record.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DriveBench file {path} does not exist")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of DriveBench records, found {type(records).__name__}")
    root = Path(image_root) if image_root is not None else None
    items = [_item_from_record(record, index, root, path) for index, record in enumerate(records)]
    return _unique_keys(items, records, path)


def _item_from_record(record: Any, index: int, root: Path | None, path: Path) -> EvalItem:
    where = f"{path} record {index}"
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object, found {type(record).__name__}")
    for field in ("question", "answer", "category"):
        if not isinstance(record.get(field), str):
            raise ValueError(f"{where}: field '{field}' must be a string, found {record.get(field)!r}")
    question = record["question"].strip()
    if not question:
        raise ValueError(f"{where}: field 'question' is empty")
    category = record["category"].strip().lower()
    category = CATEGORY_ALIASES.get(category, category)
    if category not in DRIVEBENCH_CATEGORY_MAP:
        known = sorted([*DRIVEBENCH_CATEGORY_MAP, *CATEGORY_ALIASES])
        raise ValueError(f"{where}: field 'category' is {record['category']!r}; expected one of {known}")
    views, images = _ordered_images(record.get("img_paths"), where, root)
    return EvalItem(
        key=_record_key(record, where),
        capability=DRIVEBENCH_CATEGORY_MAP[category],
        question=question,
        answer=record["answer"].strip(),
        images=images,
        views=views,
        source_category=category,
        multiple_choice=is_multiple_choice(question),
    )


def _ordered_images(img_paths: Any, where: str, root: Path | None) -> tuple[list[str], list[str]]:
    """(camera names, image paths) in `NUSCENES_CAMERAS` order from a record's `img_paths`."""
    if not isinstance(img_paths, dict) or not img_paths:
        raise ValueError(
            f"{where}: field 'img_paths' must be a non-empty object camera name -> path, found {img_paths!r}"
        )
    unknown = sorted(set(img_paths) - set(NUSCENES_CAMERAS))
    if unknown:
        raise ValueError(f"{where}: field 'img_paths' has unknown cameras {unknown}; known: {list(NUSCENES_CAMERAS)}")
    views, images = [], []
    for camera in NUSCENES_CAMERAS:
        if camera not in img_paths:
            continue
        image = img_paths[camera]
        if not isinstance(image, str) or not image.strip():
            raise ValueError(f"{where}: field 'img_paths.{camera}' must be a non-empty path, found {image!r}")
        views.append(camera)
        images.append(str(root / image) if root is not None and not Path(image).is_absolute() else image)
    return views, images


def _record_key(record: dict[str, Any], where: str) -> str:
    for field in ID_FIELDS:
        if field in record:
            value = record[field]
            if not isinstance(value, (str, int)) or isinstance(value, bool) or str(value).strip() == "":
                raise ValueError(f"{where}: id field '{field}' must be a non-empty string or integer, found {value!r}")
            return str(value).strip()
    content = {
        field: record.get(field)
        for field in ("scene_token", "frame_token", "category", "question", "answer", "img_paths")
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
