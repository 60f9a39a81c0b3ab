"""QA record schema: every accepted input variant and every rejected one with its message."""

import pytest

from schemas.qa import (
    CAPABILITIES,
    QA_SCHEMA_VERSION,
    QARecord,
    RecordError,
    camera_view,
    normalise_capability,
    parse_record,
    parse_records,
)
from schemas.shards import ShardManifest, dataset_digest

SIX = [f".../nuscenes/samples/{cam}/n008__{cam}__1.jpg" for cam in (
    "CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK_RIGHT", "CAM_BACK"
)]


def authors_record(question="<image>\nWhat is ahead?", answer="A car.", images=None, **extra):
    record = {
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        "images": ["bdd/val/a.jpg"] if images is None else images,
        "question_type": "perception",
    }
    record.update(extra)
    return record


def parse_one(item, **kwargs):
    return parse_record(item, source="qa.json", index=3, **kwargs)


def rejected(item, **kwargs) -> RecordError:
    with pytest.raises(RecordError) as info:
        parse_one(item, **kwargs)
    return info.value


# ---------------------------------------------------------------- accepted variants


def test_authors_format_single_image():
    record = parse_one(authors_record())
    assert record.capability == "perception"
    assert record.question == "<image>\nWhat is ahead?"
    assert record.answer == "A car."
    assert record.key == "" and record.source == "qa.json" and record.index == 3
    assert [(ref.view, ref.file, ref.source_path) for ref in record.images] == [(None, "", "bdd/val/a.jpg")]


def test_placeholders_in_the_middle_and_many_are_kept():
    question = "Front left <image> front <image> front right <image>\n" + "<image>" * 3 + " Which is closest?"
    record = parse_one(authors_record(question=question, images=SIX))
    assert record.question == question
    assert [ref.view for ref in record.images] == [
        "CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK_RIGHT", "CAM_BACK"
    ]


def test_no_placeholder_puts_all_images_first():
    record = parse_one(authors_record(question="What should ego do?", images=SIX[:2]))
    assert record.question == "<image>\n<image>\nWhat should ego do?"


def test_object_references_are_kept_verbatim():
    answer = "Yield to <c1,CAM_FRONT,0.4678,0.6772> then pass <c2,CAM_BACK,0.1,0.9>."
    assert parse_one(authors_record(answer=answer)).answer == answer


@pytest.mark.parametrize("field", ["question_type", "type", "capability"])
def test_label_fields(field):
    item = authors_record()
    del item["question_type"]
    item[field] = "planning"
    assert parse_one(item).capability == "planning"


def test_question_type_wins_over_type():
    assert parse_one(authors_record(type="planning")).capability == "perception"


@pytest.mark.parametrize("capability,aliases", [
    ("perception", ["perception", "perceptual", "perceive", "per", "p", " PERCEPTION ", "P"]),
    ("reasoning", ["reasoning", "reason", "logical_reasoning", "infer", "r", "Reason"]),
    ("planning", ["planning", "plan", "pl", "d", "decision", "Decision "]),
])
def test_every_alias(capability, aliases):
    for alias in aliases:
        assert normalise_capability(alias) == capability
        assert parse_one(authors_record(question_type=alias)).capability == capability


@pytest.mark.parametrize("label,capability", [
    ("scene_perception", "perception"), ("behaviour_reasoning", "reasoning"), ("MotionPlanning", "planning"),
])
def test_substring_labels(label, capability):
    assert normalise_capability(label) == capability


def test_unknown_label_with_fallback_is_accepted():
    assert normalise_capability("prediction", fallback="reasoning") == "reasoning"
    assert parse_one(authors_record(question_type="prediction"), on_unknown_type="reasoning").capability == "reasoning"


@pytest.mark.parametrize("wrapper", ["data", "items", "samples", "dataset", "records"])
def test_wrapper_keys(wrapper):
    parsed = parse_records({wrapper: [authors_record(), authors_record()], "meta": {}}, source="qa.json")
    assert parsed.total == 2 and not parsed.errors
    assert [record.index for record in parsed.records] == [0, 1]


def test_plain_question_answer_and_single_image_string():
    record = parse_one({"question": "Is it safe?", "answer": "Yes.", "images": "a.png", "type": "d"})
    assert (record.question, record.answer, record.capability) == ("<image>\nIs it safe?", "Yes.", "planning")
    assert len(record.images) == 1


def test_camera_view_picks_longest_name():
    assert camera_view("samples/CAM_FRONT_LEFT/n015__CAM_FRONT_LEFT__1.jpg") == "CAM_FRONT_LEFT"
    assert camera_view("samples/CAM_BACK/x.jpg") == "CAM_BACK"
    assert camera_view("bdd100k/images/val/x.jpg") is None


def test_json_round_trip():
    record = parse_one(authors_record(images=SIX[:1]))
    data = record.to_json()
    assert data["version"] == QA_SCHEMA_VERSION
    assert data["images"] == [{"view": "CAM_FRONT_LEFT", "file": "", "source_path": SIX[0]}]
    assert QARecord.from_json(data) == record


# ---------------------------------------------------------------- rejected variants


def test_missing_messages_and_question():
    item = authors_record()
    del item["messages"]
    err = rejected(item)
    assert (err.source, err.index, err.field) == ("qa.json", 3, "messages")
    assert str(err).startswith("qa.json record 3, field 'messages': missing")
    assert "Fix:" in str(err)


def test_plain_question_without_answer():
    assert rejected({"question": "q", "images": ["a.jpg"], "type": "p"}).field == "answer"


def test_wrong_role():
    item = authors_record()
    item["messages"][1]["role"] = "user"
    err = rejected(item)
    assert err.field == "messages[1].role"
    assert "expected 'assistant', got 'user'" in str(err)


def test_wrong_number_of_messages():
    item = authors_record()
    item["messages"].append({"role": "user", "content": "more"})
    assert "got 3 messages" in str(rejected(item))


def test_non_string_content():
    item = authors_record()
    item["messages"][1]["content"] = 17
    assert str(rejected(item)).startswith(
        "qa.json record 3, field 'messages[1].content': expected a string, got int. Fix: "
    )


def test_placeholder_count_mismatch():
    err = rejected(authors_record(question="<image> and <image>?", images=SIX))
    assert err.field == "messages[0].content"
    assert "holds 2 <image> placeholders but 'images' lists 6 paths" in str(err)


def test_images_not_a_list():
    err = rejected(authors_record(images={"front": "a.jpg"}))
    assert err.field == "images" and "expected a list of image paths, got dict" in str(err)


def test_empty_images():
    assert "empty list" in str(rejected(authors_record(images=[])))


def test_non_string_image_path():
    assert rejected(authors_record(images=["a.jpg", 5])).field == "images[1]"


def test_missing_label():
    item = authors_record()
    del item["question_type"]
    assert "missing" in str(rejected(item))


def test_unknown_label_without_fallback():
    err = rejected(authors_record(question_type="prediction"))
    assert err.field == "question_type"
    assert "unknown capability label 'prediction'" in str(err) and "--on-unknown-type" in str(err)
    with pytest.raises(ValueError, match="unknown capability label 'prediction'"):
        normalise_capability("prediction")


def test_bad_fallback():
    with pytest.raises(ValueError, match="fallback capability 'driving'"):
        normalise_capability("p", fallback="driving")


def test_record_not_an_object():
    assert rejected(["a"]).field == "(record)"


@pytest.mark.parametrize("obj,message", [
    ("text", "top level must be a list or an object, got str"),
    ({"rows": []}, "no record list"),
    ({"data": [], "items": []}, "several record lists"),
])
def test_top_level_not_list_or_wrapper(obj, message):
    with pytest.raises(ValueError, match=message):
        parse_records(obj, source="qa.json")


def test_all_record_errors_are_collected():
    bad_role = authors_record()
    bad_role["messages"][0]["role"] = "system"
    items = [authors_record(), bad_role, authors_record(images=[]), authors_record(question_type="x")]
    parsed = parse_records(items, source="qa.json")
    assert [record.index for record in parsed.records] == [0]
    assert [(err.index, err.field) for err in parsed.errors] == [
        (1, "messages[0].role"), (2, "images"), (3, "question_type")
    ]


def test_from_json_refuses_unknown_version():
    data = parse_one(authors_record()).to_json() | {"version": 99}
    with pytest.raises(ValueError, match="schema version 99; this code reads version 1"):
        QARecord.from_json(data)


def test_from_json_refuses_malformed_record():
    data = parse_one(authors_record()).to_json()
    del data["answer"]
    with pytest.raises(ValueError, match="malformed"):
        QARecord.from_json(data)


# ---------------------------------------------------------------- shard manifest


def test_manifest_round_trip_and_version_check(tmp_path):
    manifest = ShardManifest(
        version=1,
        dataset_digest=dataset_digest(["b", "a"]),
        shards=[],
        counts=dict.fromkeys(CAPABILITIES, 0),
    )
    assert manifest.dataset_digest == dataset_digest(["a", "b"])
    manifest.write(tmp_path / "manifest.json")
    assert ShardManifest.read(str(tmp_path / "manifest.json")) == manifest
    with pytest.raises(ValueError, match="manifest version 2, this code reads version 1"):
        ShardManifest.from_json(manifest.to_json() | {"version": 2})
    with pytest.raises(ValueError, match="not a drive-kd/qa-shards manifest"):
        ShardManifest.from_json({"format": "other"})
