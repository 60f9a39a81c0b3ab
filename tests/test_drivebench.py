"""Reading DriveBench records (pipeline/drivebench.py)."""

import json
import re

import pytest

from pipeline.evaluation.drivebench import (
    DRIVEBENCH_CATEGORY_MAP,
    NUSCENES_CAMERAS,
    load_drivebench,
    looks_like_drivebench,
)
from schemas.qa import CAPABILITIES

ALL_CAMERAS = {camera: f"samples/{camera}/frame0.jpg" for camera in reversed(NUSCENES_CAMERAS)}


def _record(**overrides):
    record = {
        "scene_token": "s1",
        "frame_token": "f1",
        "question": "What is the moving status of object <c1,CAM_BACK,1088.3,497.5>? Please select the correct "
        "answer from the following options: A. Going ahead. B. Turn right. C. Turn left. D. Stopped.",
        "answer": "A. Going ahead.",
        "tag": [0],
        "category": "prediction",
        "img_paths": dict(ALL_CAMERAS),
    }
    record.update(overrides)
    return record


def _write(tmp_path, records):
    path = tmp_path / "drivebench.json"
    path.write_text(json.dumps(records))
    return path


def test_category_map_covers_drivebench_and_targets_capabilities():
    assert set(DRIVEBENCH_CATEGORY_MAP) == {"perception", "prediction", "planning", "behavior"}
    assert set(DRIVEBENCH_CATEGORY_MAP.values()) == set(CAPABILITIES)


@pytest.mark.parametrize(
    ("category", "capability", "source"),
    [
        ("perception", "perception", "perception"),
        ("Prediction", "reasoning", "prediction"),
        ("PLANNING", "planning", "planning"),
        ("behavior", "planning", "behavior"),
        (" Behaviour ", "planning", "behavior"),
    ],
)
def test_categories_map_to_capabilities(tmp_path, category, capability, source):
    (item,) = load_drivebench(_write(tmp_path, [_record(category=category)]))
    assert (item.capability, item.source_category) == (capability, source)


def test_item_fields_and_camera_order(tmp_path):
    (item,) = load_drivebench(_write(tmp_path, [_record()]), image_root=tmp_path / "nuscenes")
    assert item.views == list(NUSCENES_CAMERAS)
    assert item.images == [str(tmp_path / "nuscenes" / f"samples/{camera}/frame0.jpg") for camera in NUSCENES_CAMERAS]
    assert item.answer == "A. Going ahead."
    assert item.multiple_choice is True
    assert re.fullmatch(r"[0-9a-f]{16}", item.key)


def test_subset_of_cameras_and_absolute_paths_kept(tmp_path):
    paths = {"CAM_BACK": "/data/back.jpg", "CAM_FRONT": "front.jpg"}
    (item,) = load_drivebench(_write(tmp_path, [_record(img_paths=paths, question="Describe the scene.")]))
    assert item.views == ["CAM_FRONT", "CAM_BACK"]
    assert item.images == ["front.jpg", "/data/back.jpg"]
    assert item.multiple_choice is False


def test_keys_are_content_hashes_stable_across_loads_and_extra_fields(tmp_path):
    first = load_drivebench(_write(tmp_path, [_record(), _record(question="Other question?")]))
    second = load_drivebench(_write(tmp_path, [_record(question="Other question?", tag=[2]), _record(extra=1)]))
    assert [item.key for item in first] == [item.key for item in reversed(second)]
    assert first[0].key != first[1].key


def test_id_field_is_the_key(tmp_path):
    items = load_drivebench(_write(tmp_path, [_record(id=7), _record(question_id="q-2")]))
    assert [item.key for item in items] == ["7", "q-2"]


def test_exact_duplicates_get_suffixed_keys(tmp_path):
    items = load_drivebench(_write(tmp_path, [_record(), _record(), _record()]))
    base = items[0].key
    assert [item.key for item in items] == [base, f"{base}-1", f"{base}-2"]


def test_repeated_ids_are_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"record 1: id '5' repeats record 0"):
        load_drivebench(_write(tmp_path, [_record(id=5), _record(id=5, question="Other?")]))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"category": "driving"}, r"record 1: field 'category' is 'driving'"),
        ({"question": None}, r"record 1: field 'question' must be a string"),
        ({"question": "  "}, r"record 1: field 'question' is empty"),
        ({"answer": 3}, r"record 1: field 'answer' must be a string"),
        ({"img_paths": ["a.jpg"]}, r"record 1: field 'img_paths' must be a non-empty object"),
        ({"img_paths": {}}, r"record 1: field 'img_paths' must be a non-empty object"),
        ({"img_paths": {"CAM_TOP": "a.jpg"}}, r"record 1: field 'img_paths' has unknown cameras \['CAM_TOP'\]"),
        ({"img_paths": {"CAM_FRONT": ""}}, r"record 1: field 'img_paths.CAM_FRONT' must be a non-empty path"),
        ({"id": ""}, r"record 1: id field 'id' must be a non-empty string or integer"),
    ],
)
def test_errors_name_record_and_field(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        load_drivebench(_write(tmp_path, [_record(), _record(**overrides)]))


def test_file_level_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_drivebench(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_drivebench(bad)
    with pytest.raises(ValueError, match="expected a JSON list"):
        load_drivebench(_write(tmp_path, {"data": []}))
    with pytest.raises(ValueError, match="record 0: expected an object"):
        load_drivebench(_write(tmp_path, ["text"]))


def test_looks_like_drivebench():
    assert looks_like_drivebench([_record()])
    assert looks_like_drivebench(_record())
    assert not looks_like_drivebench([{"messages": [], "images": [], "question_type": "perception"}])
    assert not looks_like_drivebench([])
    assert not looks_like_drivebench({"data": [_record()]})
    assert not looks_like_drivebench("text")
