"""Tests for the synthetic driving QA generator (pipeline.demo_data, pipeline.scenes)."""

import json
import random
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from PIL import Image

from pipeline.data.demo import (
    ACTION_OPTIONS,
    CAPABILITIES,
    CAPTION_QUESTION,
    FAMILIES,
    LETTERS,
    STOP_REASON_OPTIONS,
    TARGET_LANE_OPTIONS,
    build_samples,
    generate,
    vocabulary_corpus,
)
from pipeline.data.scenes import (
    COLOURS,
    FRONT,
    LAMP_ON,
    LIGHT_BOX,
    LIGHT_STATES,
    SURROUND,
    crossing_pedestrian,
    describe,
    lead_vehicle,
    plan_action,
    render,
    sample_scene,
    stop_causes,
    vehicles_in_lane,
)
from pipeline.demo_data import main
from pipeline.evaluation.scoring import score_choice

SAMPLES = 120
SIZE = 112
REF = re.compile(r"<(c\d+),(CAM_[A-Z_]+),(\d\.\d{4}),(\d\.\d{4})>")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three generated folders: seed 0, seed 0 again, seed 1."""
    folders = {}
    for name, seed in (("first", 0), ("again", 0), ("other", 1)):
        folders[name] = tmp_path_factory.mktemp(name)
        generate(folders[name], samples=SAMPLES, seed=seed, image_size=SIZE)
    return folders


@pytest.fixture(scope="module")
def samples():
    return build_samples(samples=SAMPLES, seed=0)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _answer_text(record: dict) -> tuple[str, str]:
    """(letter, text) of the option a record's answer names: the answer is exactly one option's text."""
    answer = record["messages"][1]["content"]
    options = dict(re.findall(r"^([A-D])\. (.*)$", record["messages"][0]["content"], flags=re.M))
    (letter,) = [letter for letter, text in options.items() if text == answer]
    user, assistant = record["messages"]
    assert score_choice(user["content"], assistant["content"], answer).reference_choice == letter
    return letter, answer


def test_same_seed_gives_identical_bytes_and_other_seed_differs(runs):
    first = _files(runs["first"])
    assert "qa.json" in first and len(first) > SAMPLES
    assert first == _files(runs["again"])
    other = _files(runs["other"])
    assert first["qa.json"] != other["qa.json"]
    assert any(first[name] != other.get(name) for name in first if name.endswith(".png"))


def test_records_follow_the_authors_format(runs):
    records = json.loads((runs["first"] / "qa.json").read_text())
    assert isinstance(records, list) and len(records) == SAMPLES
    for record in records:
        assert set(record) == {"messages", "images", "question_type"}
        assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
        assert record["question_type"] in CAPABILITIES
        placeholders = record["messages"][0]["content"].count("<image>")
        assert placeholders in (0, len(record["images"]))
        cameras = tuple(Path(path).stem for path in record["images"])
        assert cameras in ((FRONT,), SURROUND)
        for path in record["images"]:
            assert (runs["first"] / path).is_file()
            assert Image.open(runs["first"] / path).size == (SIZE, SIZE)
        letters = re.findall(r"^([A-D])\. ", record["messages"][0]["content"], flags=re.M)
        assert "".join(letters) == LETTERS[:len(letters)] and len(letters) >= 3
        letter, _ = _answer_text(record)
        assert letter in letters
    assert any(r["messages"][0]["content"].count("<image>") == 0 for r in records)
    assert 0.1 < sum(len(r["images"]) == 6 for r in records) / SAMPLES < 0.4


def test_capabilities_and_answer_letters_are_balanced(samples):
    capabilities = Counter(s.record["question_type"] for s in samples)
    assert all(abs(capabilities[c] - SAMPLES / 3) <= 1 for c in CAPABILITIES), capabilities
    letters = defaultdict(Counter)
    for sample in samples:
        letters[sample.record["question_type"]][_answer_text(sample.record)[0]] += 1
    for capability, counts in letters.items():
        assert max(counts.values()) <= 0.4 * sum(counts.values()), (capability, counts)
    actions = Counter(_answer_text(s.record)[1] for s in samples if s.family == "action")
    assert set(actions) == set(ACTION_OPTIONS.values()) and max(actions.values()) - min(actions.values()) <= 1


def test_generate_writes_the_records_of_build_samples(runs, samples):
    assert json.loads((runs["first"] / "qa.json").read_text()) == [s.record for s in samples]


def test_every_object_centre_has_the_object_colour(runs, samples):
    checked = 0
    for sample in samples:
        for obj in sample.scene.objects:
            assert REF.fullmatch(obj.ref).groups() == (obj.oid, obj.camera, f"{obj.x:.4f}", f"{obj.y:.4f}")
            image = Image.open(runs["first"] / f"images/{sample.scene.scene_id}/{obj.camera}.png")
            assert image.getpixel((int(obj.x * SIZE), int(obj.y * SIZE))) == COLOURS[obj.colour], obj
            checked += 1
    assert checked > SAMPLES


def test_lead_colour_answers_match_the_drawn_vehicle(runs, samples):
    colour_samples = [s for s in samples if s.family == "lead_colour"]
    assert colour_samples
    for sample in colour_samples:
        colour = _answer_text(sample.record)[1].lower()
        lead = lead_vehicle(sample.scene)
        image = Image.open(runs["first"] / f"images/{sample.scene.scene_id}/{FRONT}.png")
        assert image.getpixel((int(lead.x * SIZE), int(lead.y * SIZE))) == COLOURS[colour]


def test_every_family_answers_from_the_scene(samples):
    for sample in samples:
        family = FAMILIES[sample.family]
        answer = _answer_text(sample.record)[1]
        assert family.capability == sample.record["question_type"]
        assert any(_asked(family, sample.scene, target) == answer for target in family.classes), sample.family


def _asked(family, scene, target):
    question = family.ask(scene, random.Random(0), target)
    return None if question is None else question.correct


def test_planning_answers_follow_the_driving_rules(samples):
    planning = [s for s in samples if s.record["question_type"] == "planning"]
    assert {s.family for s in planning} == {"action", "target_lane", "stop_reason"}
    for sample in planning:
        answer = _answer_text(sample.record)[1]
        action, _ = plan_action(sample.scene)
        if sample.family == "action":
            assert answer == ACTION_OPTIONS[action]
        elif sample.family == "target_lane":
            lane = {"change_left": "left", "change_right": "right"}.get(action, "ego")
            assert answer == TARGET_LANE_OPTIONS[lane]
        else:
            (cause, _), = stop_causes(sample.scene)
            assert action == "stop" and answer == STOP_REASON_OPTIONS[cause]


@pytest.mark.parametrize("settings, action", [
    ({"light": "red"}, "stop"),
    ({"sign": "stop"}, "stop"),
    ({"crossing": True}, "stop"),
    ({"light": "yellow", "sign": None, "crossing": False}, "slow_down"),
    ({"light": "green", "sign": None, "crossing": False, "lead": "moving_close"}, "slow_down"),
    ({"light": None, "sign": None, "crossing": False, "lead": "stopped", "left_busy": True, "right_busy": True},
     "slow_down"),
    ({"light": None, "sign": None, "crossing": False, "lead": "stopped", "left_busy": False}, "change_left"),
    ({"light": None, "sign": None, "crossing": False, "lead": "stopped", "left_busy": True, "right_busy": False},
     "change_right"),
    ({"light": "green", "sign": "speed_limit", "crossing": False, "lead": None}, "keep_going"),
    ({"light": None, "sign": None, "crossing": False, "lead": "moving_far"}, "keep_going"),
])
def test_plan_action_rules(settings, action):
    for seed in range(5):
        scene = sample_scene(random.Random(seed), "000000", (FRONT,), **settings)
        assert plan_action(scene)[0] == action


@pytest.mark.parametrize("state", LIGHT_STATES)
def test_traffic_light_shows_its_state(state):
    scene = sample_scene(random.Random(0), "000000", (FRONT,), light=state)
    image = render(scene, FRONT, SIZE)
    x0, y0, x1, y1 = LIGHT_BOX
    lamp_y = y0 + (y1 - y0) * (LIGHT_STATES.index(state) + 0.5) / 3
    assert image.getpixel((int((x0 + x1) / 2 * SIZE), int(lamp_y * SIZE))) == LAMP_ON[state]


def test_six_view_records_use_nuscenes_cameras_in_order():
    for sample in build_samples(samples=12, seed=2, views="6"):
        assert sample.scene.cameras == SURROUND
        assert sample.record["images"] == [f"images/{sample.scene.scene_id}/{cam}.png" for cam in SURROUND]


def test_vocabulary_corpus_covers_other_runs():
    words = {w for text in vocabulary_corpus(seed=0, samples=300) for w in re.findall(r"[A-Za-z_]+", text)}
    for sample in build_samples(samples=200, seed=7):
        for message in sample.record["messages"]:
            text = message["content"].replace("<image>", "")
            assert set(re.findall(r"[A-Za-z_]+", text)) <= words, text


@pytest.mark.parametrize("kwargs, message", [
    ({"samples": 0}, "samples"),
    ({"samples": 3, "views": "3"}, "views"),
    ({"samples": 3, "image_size": 32}, "image_size"),
])
def test_invalid_arguments_are_explained(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(tmp_path, **kwargs)


def test_cli_writes_six_view_set(tmp_path, capsys):
    main(["--out", str(tmp_path), "--samples", "4", "--views", "6", "--image-size", "96"])
    records = json.loads((tmp_path / "qa.json").read_text())
    assert len(records) == 4 and all(len(r["images"]) == 6 for r in records)
    assert "wrote 4 records and 24 images" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0


def test_captions_are_added_without_changing_the_qa_records(tmp_path):
    records = generate(tmp_path, samples=6, seed=3, captions=4)
    assert records == json.loads((tmp_path / "qa.json").read_text())
    captions = [r for r in records if r["messages"][0]["content"] == "<image>\n" + CAPTION_QUESTION]
    qa = [r for r in records if r not in captions]
    assert len(captions) == 4 and len(qa) == 6
    assert sorted(map(json.dumps, qa)) == sorted(json.dumps(s.record) for s in build_samples(samples=6, seed=3))
    for record in captions:
        assert record["question_type"] == "perception" and len(record["images"]) == 1
        assert (tmp_path / record["images"][0]).is_file()
        assert record["messages"][1]["content"].startswith("Traffic light: ")
    with pytest.raises(ValueError, match="captions"):
        generate(tmp_path, samples=2, captions=-1)


def test_description_states_every_fact_the_families_ask_about():
    for sample in build_samples(samples=90, seed=5, views="1"):
        scene, text = sample.scene, describe(sample.scene)
        assert f"Traffic light: {scene.light or 'none'}." in text
        assert f"Sign: {(scene.sign or 'none').replace('_', ' ')}." in text
        lead = lead_vehicle(scene)
        if lead is None:
            assert "Ahead: clear." in text
        else:
            assert f"Ahead: {lead.name}, {'moving' if lead.moving else 'stopped'}," in text
        for side in ("left", "right"):
            names = [o.name for o in vehicles_in_lane(scene, side)]
            assert f"{side.capitalize()} lane: {', '.join(names) or 'free'}." in text
        crossing = crossing_pedestrian(scene)
        assert f"Crossing: {crossing.name if crossing else 'none'}." in text
        assert text.endswith(f"Plan: {plan_action(scene)[0].replace('_', ' ')}.")


def test_cli_adds_captions(tmp_path, capsys):
    main(["--out", str(tmp_path), "--samples", "3", "--views", "1", "--captions", "2"])
    assert "wrote 5 records and 5 images" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path), "--samples", "3", "--captions", "-1"])
    assert exit_info.value.code == 2
    assert "captions must be in [0, inf], got -1" in capsys.readouterr().err
