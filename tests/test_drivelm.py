"""DriveLM-nuScenes -> authors' format (pipeline/drivelm.py), then ingest of the output."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pipeline.data.drivelm import DRIVELM_CATEGORY_MAP, NUSCENES_ORDER, convert_file, nuscenes_relative
from pipeline.data.shards import iter_samples
from schemas.qa import parse_records

REPO = Path(__file__).resolve().parents[1]
SCENE, FRAME, FRAME2 = "f0f120e4d4b0441da90ec53b16ee169d", "4a0798f849ca477ab18009c3a20b7df2", "b0fd8b4b0d1e4cfb"


def _entry(question, answer, tag=(0,)):
    """A QA entry with every field DriveLM-nuScenes releases."""
    return {"Q": question, "A": answer, "C": None, "con_up": None, "con_down": None, "cluster": None,
            "layer": None, "tag": list(tag)}


def _frame(frame):
    return {
        "key_object_infos": {"<c1,CAM_BACK,1088.3,497.5>": {
            "Category": "Vehicle", "Status": "Moving", "Visual_description": "Black sedan.",
            "2d_bbox": [966.6, 403.3, 1224.1, 591.7]}},
        "QA": {
            "perception": [_entry("What are the important objects in the current scene?",
                                  "There is a black sedan to the back of the ego vehicle <c1,CAM_BACK,1088.3,497.5>.")],
            "prediction": [_entry("Is <c1,CAM_BACK,1088.3,497.5> a traffic sign or a road barrier?", "No.")],
            "planning": [_entry("What actions could the ego vehicle take based on <c1,CAM_BACK,1088.3,497.5>?",
                                "The action is to keep going at the same speed.", tag=(1,))],
            "behavior": [_entry("Predict the behavior of the ego vehicle. Please select the correct answer from the "
                                "following options: A. The ego vehicle is steering to the left. B. The ego vehicle "
                                "is going straight.", "B")],
        },
        # dict order deliberately not nuScenes order, as in the released file
        "image_paths": {camera: f"../nuscenes/samples/{camera}/n008-2018-08-30__{camera}__{frame}.jpg"
                        for camera in ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK",
                                       "CAM_BACK_LEFT", "CAM_BACK_RIGHT")},
    }


@pytest.fixture
def drivelm(tmp_path):
    data = {SCENE: {"scene_description": "The ego vehicle drives through an intersection.",
                    "key_frames": {FRAME: _frame(FRAME), FRAME2: _frame(FRAME2)}}}
    path = tmp_path / "v1_1_train_nus.json"
    path.write_text(json.dumps(data))
    return path, data


def _run(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True)


def test_records_images_categories_coordinates(drivelm, tmp_path):
    path, _ = drivelm
    meta = convert_file(path, tmp_path / "qa.json")
    out = json.loads((tmp_path / "qa.json").read_text())
    records = out["records"]
    assert len(records) == 8 and meta["counts"] == {"behavior": 2, "perception": 2, "planning": 2, "prediction": 2}
    assert out["meta"]["category_map"] == DRIVELM_CATEGORY_MAP
    first = records[0]
    assert first["images"] == [f"samples/{c}/n008-2018-08-30__{c}__{FRAME}.jpg" for c in NUSCENES_ORDER]
    assert (first["scene_token"], first["frame_token"], first["drivelm_category"], first["drivelm_index"]) == (
        SCENE, FRAME, "perception", 0)
    assert first["messages"][1]["content"].endswith("<c1,CAM_BACK,0.6802,0.5528>.")
    assert [r["question_type"] for r in records[:4]] == ["perception", "reasoning", "planning", "planning"]
    parsed = parse_records(out, source="qa.json")
    assert not parsed.errors and len(parsed.records) == 8
    assert [ref.view for ref in parsed.records[0].images] == list(NUSCENES_ORDER)


def test_keep_pixel_coords(drivelm, tmp_path):
    convert_file(drivelm[0], tmp_path / "qa.json", keep_pixel_coords=True)
    out = json.loads((tmp_path / "qa.json").read_text())
    assert "<c1,CAM_BACK,1088.3,497.5>" in out["records"][0]["messages"][1]["content"]
    assert out["meta"]["coordinates"] == "pixels"


def test_output_is_byte_identical(drivelm, tmp_path):
    convert_file(drivelm[0], tmp_path / "a.json")
    convert_file(drivelm[0], tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_nuscenes_relative_paths():
    assert nuscenes_relative("../nuscenes/samples/CAM_FRONT/x.jpg") == "samples/CAM_FRONT/x.jpg"
    assert nuscenes_relative("/data/sets/nuscenes/sweeps/CAM_BACK/y.jpg") == "sweeps/CAM_BACK/y.jpg"
    assert nuscenes_relative("./CAM_FRONT/z.jpg") == "CAM_FRONT/z.jpg"


def _break(data):
    frame = data[SCENE]["key_frames"][FRAME]
    frame["QA"]["prediction"][0] = {"Q": "Will it turn?"}  # no answer
    frame["QA"]["planning"][0]["A"] = "Stop before <c2,CAM_FRONT,1700.0,10.0>."  # off the frame
    frame["QA"]["robust_qas"] = []
    del data[SCENE]["key_frames"][FRAME2]["image_paths"]["CAM_BACK_LEFT"]


def test_malformed_entries_named_and_nothing_written(drivelm, tmp_path):
    path, data = drivelm
    _break(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as err:
        convert_file(path, tmp_path / "qa.json")
    text = str(err.value)
    assert f"scene {SCENE}, frame {FRAME}, category prediction, index 0, field 'A'" in text
    assert "category planning, index 0, field 'A': object reference <c2,CAM_FRONT,1700.0,10.0> lies outside" in text
    assert "unknown category 'robust_qas'" in text
    assert f"frame {FRAME2}, field 'image_paths': missing cameras ['CAM_BACK_LEFT']" in text
    assert "--skip-bad" in text and not (tmp_path / "qa.json").exists()


def test_skip_bad_counts_and_reports(drivelm, tmp_path):
    path, data = drivelm
    _break(data)
    path.write_text(json.dumps(data))
    result = _run("pipeline.drivelm", "--qa", str(path), "--out", str(tmp_path / "qa.json"), "--skip-bad")
    assert result.returncode == 0, result.stderr
    assert "wrote 2 records" in result.stdout and "skipped 4" in result.stdout
    assert "4 malformed entries" in result.stderr
    skipped = json.loads((tmp_path / "qa.json").read_text())["meta"]["skipped"]
    assert {(s["frame"], s["category"], s["field"]) for s in skipped} == {
        (FRAME, "prediction", "A"), (FRAME, "planning", "A"), (FRAME, "robust_qas", "QA.robust_qas"),
        (FRAME2, None, "image_paths")}


def test_not_a_drivelm_file(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[]")
    result = _run("pipeline.drivelm", "--qa", str(path), "--out", str(tmp_path / "qa.json"))
    assert result.returncode != 0 and "scene_token -> scene" in result.stderr


def test_cli_output_ingests_with_nuscenes_root(drivelm, tmp_path):
    path, data = drivelm
    root = tmp_path / "nuscenes"
    for frame_data in data[SCENE]["key_frames"].values():
        for i, rel in enumerate(frame_data["image_paths"].values()):
            image = root / nuscenes_relative(rel)
            image.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 18), (30 * i, 90, 200)).save(image, format="JPEG")
    qa = tmp_path / "qa.json"
    assert _run("pipeline.drivelm", "--qa", str(path), "--out", str(qa)).returncode == 0
    result = _run("pipeline.ingest", "--qa", str(qa), "--image-root", str(root), "--out", str(tmp_path / "shards"))
    assert result.returncode == 0, result.stderr
    samples = list(iter_samples(tmp_path / "shards"))
    assert len(samples) == 8
    record = samples[0].record
    assert [ref.view for ref in record.images] == list(NUSCENES_ORDER)
    assert record.question.count("<image>") == 6
