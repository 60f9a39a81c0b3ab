"""DriveLM-nuScenes QA (OpenDriveLab/DriveLM, e.g. ``v1_1_train_nus.json``) -> the authors' QA format.

Input, a nested object exactly as released::

    {scene_token: {"scene_description": str,
                   "key_frames": {frame_token: {
                       "key_object_infos": {"<c1,CAM_BACK,1088.3,497.5>": {...}, ...},
                       "QA": {"perception" | "prediction" | "planning" | "behavior":
                              [{"Q": str, "A": str, "C": ..., "con_up": ..., "con_down": ...,
                                "cluster": ..., "layer": ..., "tag": [...]}, ...]},
                       "image_paths": {"CAM_FRONT": "../nuscenes/samples/CAM_FRONT/....jpg", ...}}}}}

Output: ``{"records": [...], "meta": {...}}`` (``schemas.qa`` reads the list under ``records``). One
record per QA pair, in file order (scene, frame, category, index): ``messages`` (one ``<image>`` per
camera before the question, then the answer), ``images`` (the six cameras in nuScenes order, paths
relative to the nuScenes root: ``samples/CAM_FRONT/...``), ``question_type`` (the Drive-KD capability),
and ``scene_token``, ``frame_token``, ``drivelm_category``, ``drivelm_index``. Object references
``<cN,CAM,x,y>`` in pixels of the 1600x900 frames become fractions of the frame (4 decimals, as in
the authors' data) unless ``keep_pixel_coords``. The same input gives byte-identical output.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm import tqdm

DRIVELM_CATEGORY_MAP: dict[str, str] = {
    "perception": "perception",
    "prediction": "reasoning",
    "planning": "planning",
    "behavior": "planning",
}
"""DriveLM QA category -> Drive-KD capability (the Drive-KD paper's mapping of DriveBench categories)."""

NUSCENES_ORDER = ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK_RIGHT", "CAM_BACK")
"""Order of the six images of every record (the surround order Drive-KD trains with)."""

FRAME_SIZE = (1600, 900)
"""Width, height of a nuScenes camera frame: object references are pixels of it."""

OBJECT_REF = re.compile(r"<(c\d+),(CAM_[A-Z_]+),([-+]?\d+(?:\.\d*)?),([-+]?\d+(?:\.\d*)?)>")
"""An object reference `<c1,CAM_BACK,1088.3,497.5>`: id, camera, x, y."""

_ROOT_DIRS = ("samples", "sweeps")


class DriveLMError(ValueError):
    """One malformed DriveLM entry, named by scene, frame, category and index (None above that level)."""

    def __init__(self, where: dict[str, Any], field: str, problem: str, fix: str):
        self.where = where
        self.field = field
        self.problem = problem
        self.fix = fix
        named = ", ".join(f"{name} {value}" for name, value in where.items() if value is not None)
        super().__init__(f"{named}, field '{field}': {problem}. Fix: {fix}")

    def to_json(self) -> dict[str, Any]:
        return {**self.where, "field": self.field, "reason": self.problem}


@dataclass
class Conversion:
    """Outcome of `convert`: the authors'-format records and one error per malformed entry."""

    records: list[dict[str, Any]]
    errors: list[DriveLMError]
    frames: int


def _where(scene: str, frame: str | None = None, category: str | None = None, index: int | None = None):
    return {"scene": scene, "frame": frame, "category": category, "index": index}


def nuscenes_relative(path: str) -> str:
    """`../nuscenes/samples/CAM_FRONT/x.jpg` -> `samples/CAM_FRONT/x.jpg` (from the first samples/sweeps dir)."""
    parts = PurePosixPath(path.replace("\\", "/")).parts
    start = next((i for i, part in enumerate(parts) if part in _ROOT_DIRS), None)
    if start is None:
        start = next((i for i, part in enumerate(parts) if part not in ("..", ".", "/")), len(parts))
    return "/".join(parts[start:])


def normalise_refs(text: str, where: dict[str, Any], field: str) -> str:
    """Replace each pixel reference `<cN,CAM,x,y>` by `<cN,CAM,x/1600,y/900>` with 4 decimals."""
    width, height = FRAME_SIZE

    def scaled(match: re.Match[str]) -> str:
        ident, camera, x, y = match.group(1), match.group(2), float(match.group(3)), float(match.group(4))
        if not (0 <= x <= width and 0 <= y <= height):
            raise DriveLMError(
                where, field, f"object reference {match.group(0)} lies outside the {width}x{height} frame",
                "correct the reference, or keep pixels with --keep-pixel-coords",
            )
        return f"<{ident},{camera},{x / width:.4f},{y / height:.4f}>"

    return OBJECT_REF.sub(scaled, text)


def frame_images(image_paths: Any, where: dict[str, Any]) -> list[str]:
    """The six image paths of a key frame in nuScenes order, relative to the nuScenes root."""
    fix = f"give 'image_paths' with one path per camera: {', '.join(NUSCENES_ORDER)}"
    if not isinstance(image_paths, dict):
        raise DriveLMError(where, "image_paths", f"expected an object camera -> path, got {image_paths!r:.80}", fix)
    missing = [camera for camera in NUSCENES_ORDER if camera not in image_paths]
    if missing:
        raise DriveLMError(where, "image_paths", f"missing cameras {missing}", fix)
    paths = []
    for camera in NUSCENES_ORDER:
        path = image_paths[camera]
        if not isinstance(path, str) or not path.strip():
            raise DriveLMError(where, f"image_paths.{camera}", f"expected a non-empty path, got {path!r}", fix)
        if camera not in PurePosixPath(path).parts:
            raise DriveLMError(where, f"image_paths.{camera}", f"path {path!r} is not in a {camera} folder", fix)
        paths.append(nuscenes_relative(path))
    return paths


def qa_record(entry: Any, images: list[str], where: dict[str, Any], *, keep_pixel_coords: bool) -> dict[str, Any]:
    """One authors'-format record of a DriveLM QA entry {"Q", "A", ...}."""
    fix = "give every QA entry string fields 'Q' (question) and 'A' (answer)"
    if not isinstance(entry, dict):
        raise DriveLMError(where, "(entry)", f"expected an object, got {type(entry).__name__}", fix)
    texts = {}
    for field in ("Q", "A"):
        value = entry.get(field)
        if not isinstance(value, str) or not value.strip():
            raise DriveLMError(where, field, f"expected a non-empty string, got {value!r:.80}", fix)
        if "<image>" in value:
            raise DriveLMError(where, field, "holds an '<image>' placeholder", "remove it from the text")
        texts[field] = value if keep_pixel_coords else normalise_refs(value, where, field)
    return {
        "messages": [
            {"role": "user", "content": "<image>\n" * len(images) + texts["Q"]},
            {"role": "assistant", "content": texts["A"]},
        ],
        "images": images,
        "question_type": DRIVELM_CATEGORY_MAP[where["category"]],
        "scene_token": where["scene"],
        "frame_token": where["frame"],
        "drivelm_category": where["category"],
        "drivelm_index": where["index"],
    }


def _frame_records(scene: str, frame: str, data: Any, *, keep_pixel_coords: bool, errors: list[DriveLMError]):
    where = _where(scene, frame)
    if not isinstance(data, dict):
        raise DriveLMError(where, "(key frame)", f"expected an object, got {type(data).__name__}",
                           "give each key frame 'QA' and 'image_paths'")
    images = frame_images(data.get("image_paths"), where)
    qa = data.get("QA")
    if not isinstance(qa, dict):
        raise DriveLMError(where, "QA", f"expected an object category -> list, got {qa!r:.80}",
                           f"give 'QA' with lists under {', '.join(DRIVELM_CATEGORY_MAP)}")
    records = []
    for category, entries in qa.items():
        if category not in DRIVELM_CATEGORY_MAP or not isinstance(entries, list):
            problem = (f"unknown category {category!r}" if category not in DRIVELM_CATEGORY_MAP
                       else f"expected a list of QA entries, got {type(entries).__name__}")
            errors.append(DriveLMError(_where(scene, frame, category), f"QA.{category}", problem,
                                       f"use lists under the categories {', '.join(DRIVELM_CATEGORY_MAP)}"))
            continue
        for index, entry in enumerate(entries):
            try:
                records.append(qa_record(entry, images, _where(scene, frame, category, index),
                                         keep_pixel_coords=keep_pixel_coords))
            except DriveLMError as err:
                errors.append(err)
    return records


def _key_frames(data: Any) -> list[tuple[str, str, Any]]:
    """(scene, frame, frame data) of every key frame, in file order; raises for a bad top level."""
    if not isinstance(data, dict):
        raise ValueError(
            f"top level must be an object scene_token -> scene, got {type(data).__name__}. Fix: pass DriveLM's "
            "nuScenes QA file (e.g. v1_1_train_nus.json); an authors'-format list goes to pipeline.ingest directly."
        )
    frames = []
    for scene, scene_data in data.items():
        key_frames = scene_data.get("key_frames") if isinstance(scene_data, dict) else None
        if not isinstance(key_frames, dict):
            frames.append((scene, None, None))
            continue
        frames.extend((scene, frame, frame_data) for frame, frame_data in key_frames.items())
    return frames


def convert(data: Any, *, keep_pixel_coords: bool = False) -> Conversion:
    """Convert a loaded DriveLM-nuScenes object, collecting every malformed entry instead of stopping."""
    records: list[dict[str, Any]] = []
    errors: list[DriveLMError] = []
    frames = _key_frames(data)
    for scene, frame, frame_data in tqdm(frames, desc="drivelm", unit="frame"):
        if frame is None:
            errors.append(DriveLMError(_where(scene), "key_frames", "missing or not an object",
                                       "give each scene 'key_frames': {frame_token: {...}}"))
            continue
        try:
            records += _frame_records(scene, frame, frame_data, keep_pixel_coords=keep_pixel_coords, errors=errors)
        except DriveLMError as err:
            errors.append(err)
    return Conversion(records=records, errors=errors, frames=len(frames))


def describe(errors: list[DriveLMError], *, source: str, limit: int = 10) -> str:
    """The first `limit` errors, the count and the fixes, as lines."""
    lines = [f"{len(errors)} malformed entries in {source}" + (f" (first {limit} shown):" if len(errors) > limit else ":")]
    lines += [f"  {err}" for err in errors[:limit]]
    if len(errors) > limit:
        lines.append(f"  ... and {len(errors) - limit} more")
    return "\n".join(lines)


def convert_file(qa_path: str | Path, out_path: str | Path, *, keep_pixel_coords: bool = False,
                 skip_bad: bool = False) -> dict[str, Any]:
    """Convert DriveLM file `qa_path` into an authors'-format JSON at `out_path`; returns its `meta`.

    Malformed entries raise one ValueError listing them (nothing written) unless `skip_bad`: then they
    are left out and listed in `meta["skipped"]`.
    """
    qa_path, out_path = Path(qa_path), Path(out_path)
    if not qa_path.is_file():
        raise FileNotFoundError(f"DriveLM file {qa_path} not found. Fix: pass e.g. v1_1_train_nus.json with --qa.")
    try:
        data = json.loads(qa_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{qa_path}: not valid UTF-8 JSON ({err}). Fix: re-download the file.") from err
    result = convert(data, keep_pixel_coords=keep_pixel_coords)
    if result.errors and not skip_bad:
        raise ValueError(f"{describe(result.errors, source=qa_path.name)}\nOr pass --skip-bad to leave them out "
                         "(they are listed under meta.skipped of the output).")
    if result.errors:
        print(f"skipped (--skip-bad): {describe(result.errors, source=qa_path.name)}", file=sys.stderr)
    if not result.records:
        raise ValueError(f"{qa_path} gave no QA records. Fix: check that it is a DriveLM-nuScenes QA file.")
    meta = {
        "converter": "pipeline.drivelm",
        "source": qa_path.name,
        "category_map": DRIVELM_CATEGORY_MAP,
        "camera_order": list(NUSCENES_ORDER),
        "image_paths": "relative to the nuScenes root (pass it as --image-root to pipeline.ingest)",
        "coordinates": "pixels" if keep_pixel_coords else f"fractions of the {FRAME_SIZE[0]}x{FRAME_SIZE[1]} frame",
        "frames": result.frames,
        "counts": dict(sorted(Counter(r["drivelm_category"] for r in result.records).items())),
        "skipped": [err.to_json() for err in result.errors],
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"meta": meta, "records": result.records}, ensure_ascii=False, indent=1)
    out_path.write_text(text + "\n", encoding="utf-8")
    return meta
