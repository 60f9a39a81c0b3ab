"""The one layout builder: labels, vision mask, digests shared by teacher and student."""

import pytest
import torch
from conftest import make_sample

from pipeline.attention.layout import IGNORE_INDEX, TilingPolicy, build_layout, collate_inputs
from pipeline.models.processors import load_processor

FAMILIES = ("internvl", "qwen2_5_vl")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n_views", [1, 6])
def test_labels_cover_exactly_the_answer(tiny_models, family, n_views):
    processor = load_processor(tiny_models[family, "student"])
    record, images = make_sample(n_views)
    lay = build_layout(record, images, processor)
    labelled = lay.labels != IGNORE_INDEX
    start, end = lay.answer_span
    assert labelled.nonzero().flatten().tolist() == list(range(start, end))
    text = processor.tokenizer.decode(lay.labels[labelled])
    assert text == record.answer + processor.tokenizer.eos_token  # object reference survives verbatim
    assert not (labelled & lay.is_vision).any()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n_views", [1, 6])
def test_vision_mask_matches_image_tokens(tiny_models, family, n_views):
    processor = load_processor(tiny_models[family, "student"])
    record, images = make_sample(n_views)
    lay = build_layout(record, images, processor)
    assert torch.equal(lay.is_vision, lay.input_ids == processor.image_token_id)
    assert len(lay.vision_spans) == n_views
    per_image = {end - start for start, end in lay.vision_spans}
    assert per_image == {49}  # 112 px tile, patch 8, 2x2 merge
    assert lay.n_vision == 49 * n_views and lay.n_text + lay.n_vision == lay.seq_len


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n_views", [1, 6])
def test_teacher_and_student_digests_agree(tiny_models, family, n_views):
    record, images = make_sample(n_views)
    teacher = build_layout(record, images, load_processor(tiny_models[family, "teacher"]))
    student = build_layout(record, images, load_processor(tiny_models[family, "student"]))
    assert teacher.digest == student.digest
    assert torch.equal(teacher.input_ids, student.input_ids)


def test_different_tiling_gives_different_digest(tiny_models):
    processor = load_processor(tiny_models["internvl", "student"])
    record, images = make_sample(1, size=(400, 120))  # wide: dynamic tiling cuts 3 tiles + a thumbnail
    one = build_layout(record, images, processor)
    other_size = build_layout(record, images, processor, tiling=TilingPolicy(tile_size=96))
    tiled = build_layout(record, images, processor, tiling=TilingPolicy(tile_size=112, max_tiles=4))
    assert len({one.digest, other_size.digest, tiled.digest}) == 3
    assert tiled.n_vision == 4 * one.n_vision


def test_different_question_gives_different_digest(tiny_models):
    processor = load_processor(tiny_models["internvl", "student"])
    a = build_layout(*make_sample(1), processor)
    b = build_layout(*make_sample(1, question="Which colour?\nA. Red\nB. Blue"), processor)
    assert a.digest != b.digest


def test_image_count_mismatch_is_an_error(tiny_models):
    processor = load_processor(tiny_models["internvl", "student"])
    record, images = make_sample(6)
    with pytest.raises(ValueError, match="6 images, got 5"):
        build_layout(record, images[:5], processor)


def test_qwen_rejects_multi_tile_policy(tiny_models):
    processor = load_processor(tiny_models["qwen2_5_vl", "student"])
    with pytest.raises(ValueError, match="no tiling"):
        build_layout(*make_sample(1), processor, tiling=TilingPolicy(tile_size=112, max_tiles=2))


@pytest.mark.parametrize("family", FAMILIES)
def test_collate_left_pads(tiny_models, family):
    processor = load_processor(tiny_models[family, "student"])
    short = build_layout(*make_sample(1), processor)
    long = build_layout(*make_sample(6, key="k1"), processor)
    batch = collate_inputs([short.model_inputs, long.model_inputs], processor.tokenizer.pad_token_id)
    pad = long.seq_len - short.seq_len
    assert batch["input_ids"].shape == (2, long.seq_len)
    assert batch["attention_mask"][0, :pad].sum() == 0 and batch["attention_mask"][0, pad:].all()
    assert torch.equal(batch["input_ids"][0, pad:], short.input_ids)
    assert torch.equal(batch["input_ids"][1], long.input_ids)
    n_pixels = short.model_inputs["pixel_values"].shape[0] + long.model_inputs["pixel_values"].shape[0]
    assert batch["pixel_values"].shape[0] == n_pixels
