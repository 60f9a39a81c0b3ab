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


# ---------------------------------------------------------------- real checkpoints' processor defaults


@pytest.fixture(scope="module")
def real_default_processors():
    """Processors with the real checkpoints' image settings and templates (InternVL3-hf: 448 px tiles,
    crop_to_patches=True up to 12 tiles; Qwen2.5-VL-Instruct: patch 14, merge 2, 3136..12845056 pixels,
    default system turn), on a small local tokenizer with the real special tokens."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from pipeline.models.processors import (
        INTERNVL_CHAT_TEMPLATE,
        PROCESSOR_CLASSES,
        QWEN_CHAT_TEMPLATE,
        build_tokenizer,
    )

    corpus = ["What colour is the car ahead? A. Red B. Blue <c1,CAM_FRONT,0.4678,0.6772>", "You are a helpful assistant."]
    internvl = PROCESSOR_CLASSES["internvl"](
        image_processor=GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=True,
                                                 min_patches=1, max_patches=12),
        tokenizer=build_tokenizer(corpus, "internvl", vocab_size=400), image_seq_length=256,
        chat_template=INTERNVL_CHAT_TEMPLATE)
    qwen = PROCESSOR_CLASSES["qwen2_5_vl"](
        image_processor=Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056, patch_size=14, merge_size=2,
                                                 temporal_patch_size=2),
        tokenizer=build_tokenizer(corpus, "qwen2_5_vl", vocab_size=400), chat_template=QWEN_CHAT_TEMPLATE)
    return {"internvl": internvl, "qwen2_5_vl": qwen}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n_views", [1, 6])
def test_real_defaults_give_one_448_tile_of_256_tokens(real_default_processors, family, n_views):
    processor = real_default_processors[family]
    record, images = make_sample(n_views, size=(1600, 900))  # a nuScenes frame: 1.8K tokens / 13 tiles by default
    lay = build_layout(record, images, processor)
    assert lay.tiling == TilingPolicy(tile_size=448)
    assert [end - start for start, end in lay.vision_spans] == [256] * n_views
    assert lay.summary()["tiling"] == {"tile_size": 448, "max_tiles": 1}


def test_real_qwen_template_default_system_turn(real_default_processors):
    from pipeline.attention.layout import build_prompt
    from pipeline.models.processors import QWEN_DEFAULT_SYSTEM

    processor = real_default_processors["qwen2_5_vl"]
    tokenizer = processor.tokenizer
    record, images = make_sample(1, size=(1600, 900))
    lay = build_layout(record, images, processor)
    assert tokenizer.decode(lay.input_ids).startswith(f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}<|im_end|>\n")
    labelled = lay.labels != IGNORE_INDEX
    assert tokenizer.decode(lay.labels[labelled]) == record.answer + tokenizer.eos_token
    assert not lay.is_vision[: lay.vision_spans[0][0]].any()  # the system turn is text
    prompt = build_prompt(record, images, processor)["input_ids"][0]
    assert torch.equal(prompt, lay.input_ids[: prompt.numel()])
    own = tokenizer.decode(build_prompt(record, images, processor, system="Drive.")["input_ids"][0])
    assert own.startswith("<|im_start|>system\nDrive.<|im_end|>") and QWEN_DEFAULT_SYSTEM not in own


def test_processor_backend_pinned_to_pil(tiny_models):
    from pipeline.models.processors import IMAGE_BACKEND, image_backend

    for family in FAMILIES:
        assert image_backend(load_processor(tiny_models[family, "student"])) == IMAGE_BACKEND == "pil"
