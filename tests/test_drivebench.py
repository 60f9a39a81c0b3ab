"""Reading DriveBench records, released and converted layouts (pipeline/evaluation/drivebench.py)."""

import json
import re

import pytest

from pipeline.evaluation.drivebench import (
    DRIVEBENCH_CAMERAS,
    DRIVEBENCH_CATEGORY_MAP,
    NUSCENES_CAMERAS,
    DriveBenchOptions,
    is_yes_no,
    load_drivebench,
    looks_like_drivebench,
    select_items,
)
from schemas.method import CAPABILITIES

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
    (item,) = load_drivebench(_write(tmp_path, [_record(img_paths=paths, question="Describe the scene.", tag=[2])]))
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


# ---------------------------------------------------------------- the released layout

RELEASED_PATHS = {camera: f"data/nuscenes/samples/{camera}/n015-2018__{camera}__1533.jpg" for camera in NUSCENES_CAMERAS}


def _released(question_type="perception", question="What are the important objects in the current scene?",
              answer="There is a white car to the front of the ego vehicle.", tag=2, **overrides):
    """A record of DriveBench's released files (question_type, image_path, integer tag)."""
    record = {"scene_token": "cc8c0bf57f984915a77078b10eb33198", "frame_token": "ca9a282c9e77460f8360f564131a8af5",
              "question_type": question_type, "question": question, "answer": answer, "tag": tag,
              "image_path": dict(RELEASED_PATHS)}
    record.update(overrides)
    return record


def test_released_layout_tags_and_categories(tmp_path):
    records = [
        _released(),
        _released("prediction", "Is <c1,CAM_FRONT,0.5,0.5> a traffic sign or a road barrier?", "No.", tag=3),
        _released("planning", "What actions could the ego vehicle take?", "Keep going at the same speed.", tag=1),
        _released("behavior", "Predict the behavior of the ego vehicle. Please select the correct answer from the "
                  "following options: A. Going straight. B. Turning left.", "A", tag=0),
    ]
    items = load_drivebench(_write(tmp_path, records))
    assert [(i.capability, i.source_category, i.tag, i.multiple_choice) for i in items] == [
        ("perception", "perception", 2, False), ("reasoning", "prediction", 3, False),
        ("planning", "planning", 1, False), ("planning", "behavior", 0, True)]
    assert looks_like_drivebench(records)
    assert items[0].views == list(NUSCENES_CAMERAS)


def test_tag_zero_is_multiple_choice_even_without_lettered_options(tmp_path):
    (item,) = load_drivebench(_write(tmp_path, [_released(question="Which lane?", answer="Left", tag=0)]))
    assert item.multiple_choice is True
    (item,) = load_drivebench(_write(tmp_path, [_released(question="A. x B. y which?", answer="A", tag=[2])]))
    assert (item.tag, item.multiple_choice) == (2, False)


def test_camera_orders(tmp_path):
    path = _write(tmp_path, [_released()])
    assert load_drivebench(path, options=DriveBenchOptions(camera_order="drivebench"))[0].views == list(
        DRIVEBENCH_CAMERAS)
    assert DRIVEBENCH_CAMERAS[:3] == ("CAM_FRONT", "CAM_FRONT_LEFT", "CAM_FRONT_RIGHT")


def test_prediction_yes_no_left_out_by_default_and_recorded(tmp_path):
    records = [_released("prediction", "Is it moving?", "Yes, it is moving.", tag=3),
               _released("prediction", "Where will it go?", "No change; it keeps its lane.", tag=3),
               _released("perception", "Is it a car?", "No.", tag=2)]
    items = load_drivebench(_write(tmp_path, records))
    kept, left_out = select_items(items, DriveBenchOptions())
    assert [i.question for i in kept] == ["Is it a car?"]  # "No change" starts with "no": a yes/no reply
    assert left_out == {"prediction yes/no (DriveBench leaves these out)": 2}
    assert select_items(items, DriveBenchOptions(prediction_yes_no="judge")) == (items, {})
    assert not is_yes_no(items[2])


def test_robust_qas_names_the_mapping_option(tmp_path):
    path = _write(tmp_path, [_released(), _released("robust_qas")])
    with pytest.raises(ValueError, match=r"record 1: field 'question_type' is 'robust_qas'.*--map-category robust_qas="):
        load_drivebench(path)
    items = load_drivebench(path, options=DriveBenchOptions(extra_categories={"robust_qas": "perception"}))
    assert items[1].capability == "perception"
    with pytest.raises(ValueError, match="--map-category robust_qas=vision: 'vision' is not one of"):
        DriveBenchOptions(extra_categories={"robust_qas": "vision"})


@pytest.mark.parametrize(("tag", "message"), [(7, r"field 'tag' is 7; expected one of \[0, 1, 2, 3\]"),
                                              ("0", r"field 'tag' is '0'"), (True, "field 'tag' is True")])
def test_bad_tags_are_errors(tmp_path, tag, message):
    with pytest.raises(ValueError, match=message):
        load_drivebench(_write(tmp_path, [_released(tag=tag)]))


def test_released_layout_field_errors(tmp_path):
    with pytest.raises(ValueError, match=r"record 0: field 'image_path' has unknown cameras \['LIDAR_TOP'\]"):
        load_drivebench(_write(tmp_path, [_released(image_path={"LIDAR_TOP": "x.bin"})]))
    with pytest.raises(ValueError, match=r"record 0: field 'question_type' must be a string"):
        load_drivebench(_write(tmp_path, [_released(question_type=None)]))


def test_options_recorded():
    described = DriveBenchOptions(camera_order="drivebench").describe()
    assert described["camera_order"] == list(DRIVEBENCH_CAMERAS)
    assert described["prediction_yes_no"] == "skip" and described["tags"]["0"] == "multiple choice"


# ---------------------------------------------------------------- DriveBench's own prompt and score reading


def _drivebench_reads(reply):
    """DriveBench's reading of a judge reply (worldbench/DriveBench evaluate/request.py): the first match."""
    match = re.search(r"Total Score:\s*(\d{1,3})\b", reply)
    return None if match is None else float(match.group(1))


@pytest.mark.parametrize("reply", [
    "1. Answer Correctness (50 points): 50\n2. Object Recognition (10 points): 5\nTotal Score: 55\n\nBrief Summary: ok.",
    "1. Action Alignment (20 points): 10\nTotal Score: 62\n\nBrief Summary: criterion 1 score: 10 of 20.",
    "Total Score: 40\nOn reflection the answer is better.\nTotal Score: 70",
    "Total Score:80",
    "Total Score: 0",
    "Total Score: 85.5 (rounded)",
])
def test_judge_reads_total_score_as_drivebench_does(reply):
    from pipeline.evaluation.judge import parse_score

    assert parse_score(reply) == _drivebench_reads(reply) is not None


def test_system_prompt_is_drivebench_and_names_its_camera_order():
    from pipeline.evaluation.evaluate import DRIVEBENCH_SYSTEM_PROMPT

    text = DRIVEBENCH_SYSTEM_PROMPT.read_text(encoding="utf-8")
    named = re.search(r"in the order \[([A-Z_, ]+)\]", text).group(1).split(", ")
    assert tuple(named) == DRIVEBENCH_CAMERAS
    assert "normalized to [0, 1]" in text and "multiple-choice" in text
