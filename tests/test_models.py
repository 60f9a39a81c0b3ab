"""Model factory, resolution and real-size configs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_sample

from pipeline.attention.layout import build_layout
from pipeline.models.load import KNOWN_MODELS, decoder_layers, load_model, resolve_model
from pipeline.models.processors import family_of, load_processor
from pipeline.models.shapes import real_config


@pytest.mark.parametrize("family", ["internvl", "qwen2_5_vl"])
def test_tiny_models_load_offline_and_run(tiny_models, family):
    teacher_dir, student_dir = tiny_models[family, "teacher"], tiny_models[family, "student"]
    teacher, student = load_model(teacher_dir), load_model(student_dir)
    assert family_of(teacher_dir) == family
    assert decoder_layers(teacher) > decoder_layers(student)
    t_cfg, s_cfg = teacher.config.get_text_config(), student.config.get_text_config()
    assert t_cfg.num_attention_heads > s_cfg.num_attention_heads
    for role in (teacher, student):  # a vision tower that can learn the demo scenes
        vision = role.config.vision_config
        assert getattr(vision, "num_hidden_layers", getattr(vision, "depth", 0)) > 1 and vision.hidden_size > 32
    assert load_processor(teacher_dir).tokenizer.get_vocab() == load_processor(student_dir).tokenizer.get_vocab()
    processor = load_processor(student_dir)
    teacher_layout = build_layout(*make_sample(6), load_processor(teacher_dir))
    lay = build_layout(*make_sample(6), processor)
    assert teacher_layout.digest == lay.digest  # same text ids and vision spans for teacher and student
    with torch.no_grad():
        out = student(**lay.model_inputs)
    assert out.logits.shape == (1, lay.seq_len, len(processor.tokenizer))


def test_resolve_model(tmp_path, monkeypatch, tiny_models):
    assert resolve_model(tiny_models["internvl", "student"]) == tiny_models["internvl", "student"]
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        resolve_model("InternVL3-38B")
    assert str(tmp_path / "InternVL3-38B") in str(err.value)
    assert "OpenGVLab/InternVL3-38B-hf" in str(err.value)
    with pytest.raises(FileNotFoundError, match="not a known name"):
        resolve_model("NoSuchModel-7B")
    (tmp_path / "Qwen2.5-VL-7B-Instruct").symlink_to(tiny_models["qwen2_5_vl", "teacher"])
    assert resolve_model("Qwen2.5-VL-7B").name == "Qwen2.5-VL-7B-Instruct"


def test_foreign_directory_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
        family_of(tmp_path)


@pytest.mark.parametrize("name,layers,heads,kv", [("InternVL3-1B", 24, 14, 2), ("InternVL3-8B", 28, 28, 4),
                                                  ("InternVL3-38B", 64, 40, 8), ("Qwen2.5-VL-7B-Instruct", 28, 28, 4)])
def test_real_configs_have_published_shapes(name, layers, heads, kv):
    text = real_config(name).get_text_config()
    assert (text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (layers, heads, kv)
    assert name in KNOWN_MODELS


@pytest.mark.parametrize("name,billions", [("InternVL3-8B", 7.94), ("InternVL3-14B", 15.1), ("InternVL3-38B", 38.4),
                                           ("InternVL3-78B", 78.4), ("Qwen2.5-VL-7B-Instruct", 8.29),
                                           ("Qwen2.5-VL-32B-Instruct", 33.5), ("Qwen2.5-VL-72B-Instruct", 73.4)])
def test_real_configs_have_the_published_parameter_counts(name, billions):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoModelForImageTextToText

    with FakeTensorMode():  # shapes only: a 78B model builds in a second
        model = AutoModelForImageTextToText.from_config(real_config(name))
        count = sum(p.numel() for p in model.parameters())
    assert count / 1e9 == pytest.approx(billions, rel=0.01)


def test_tiny_cli(tmp_path):
    out = tmp_path / "m"
    subprocess.run([sys.executable, "-m", "pipeline.models", "tiny", "--family", "qwen2_5_vl", "--role", "student",
                    "--out", str(out)], check=True, capture_output=True)
    assert family_of(out) == "qwen2_5_vl" and (out / "processor_config.json").is_file()


# ---------------------------------------------------------------- the real checkpoints' configuration fields

REPO = Path(__file__).resolve().parents[1]
REAL = json.loads((REPO / "tests/fixtures/hf_checkpoint_configs.json").read_text(encoding="utf-8"))
"""Values of the real InternVL3-hf / Qwen2.5-VL-Instruct configs (sources named in the file)."""


def test_chat_templates_are_the_checkpoints_own(tiny_models):
    from pipeline.models.processors import INTERNVL_CHAT_TEMPLATE, QWEN_CHAT_TEMPLATE, QWEN_DEFAULT_SYSTEM

    assert INTERNVL_CHAT_TEMPLATE == REAL["internvl"]["chat_template"]
    assert QWEN_CHAT_TEMPLATE == REAL["qwen2_5_vl"]["chat_template"]
    assert QWEN_DEFAULT_SYSTEM == REAL["qwen2_5_vl"]["default_system"]
    for family in ("internvl", "qwen2_5_vl"):
        for role in ("teacher", "student"):
            saved = (tiny_models[family, role] / "chat_template.jinja").read_text(encoding="utf-8")
            assert saved == REAL[family]["chat_template"]
            assert load_processor(tiny_models[family, role]).chat_template == REAL[family]["chat_template"]


def test_tiny_internvl_exposes_the_real_tokens_and_ids(tiny_models):
    real = REAL["internvl"]
    processor = load_processor(tiny_models["internvl", "student"])
    tokenizer = processor.tokenizer
    for name, token in real["tokenizer"]["named_tokens"].items():
        assert getattr(tokenizer, name) == token
        assert tokenizer.tokenize(token) == [token]  # one special token, as in the real vocabulary
    assert (tokenizer.eos_token, tokenizer.pad_token) == (real["tokenizer"]["eos_token"], real["tokenizer"]["pad_token"])
    assert tokenizer.model_max_length == real["tokenizer"]["model_max_length"]
    config = load_model(tiny_models["internvl", "student"]).config
    context_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert config.image_token_id == processor.image_token_id == context_id
    assert processor.image_token_ids == [context_id, *tokenizer.convert_tokens_to_ids(["<img>", "</img>"])]
    assert config.downsample_ratio == real["config"]["downsample_ratio"]
    ip = processor.image_processor
    for name in ("crop_to_patches", "min_patches", "max_patches"):
        assert getattr(ip, name) == real["image_processor"][name]
    assert type(processor).images_kwargs["crop_to_patches"] is real["processor"]["call_default_crop_to_patches"]


def test_tiny_qwen_exposes_the_real_tokens_and_ids(tiny_models):
    real = REAL["qwen2_5_vl"]
    processor = load_processor(tiny_models["qwen2_5_vl", "student"])
    tokenizer = processor.tokenizer
    specials = ["<|endoftext|>", *real["tokenizer"]["additional_special_tokens"]]
    ids = tokenizer.convert_tokens_to_ids(specials)
    assert ids == list(range(ids[0], ids[0] + len(specials)))  # the real id order 151643..151656
    assert all(tokenizer.tokenize(token) == [token] for token in specials)
    assert not hasattr(tokenizer, "image_token")  # the real tokenizer names none: the processor falls back
    assert (processor.image_token, processor.video_token) == ("<|image_pad|>", "<|video_pad|>")
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.padding_side) == (
        real["tokenizer"]["eos_token"], real["tokenizer"]["pad_token"], real["tokenizer"]["padding_side"])
    config = load_model(tiny_models["qwen2_5_vl", "student"]).config
    offset = ids[0] - real["tokenizer"]["ids"]["<|endoftext|>"]
    for field, real_id in real["config"].items():
        assert getattr(config, field) == real_id + offset, field
    assert processor.image_token_id == config.image_token_id
    ip = processor.image_processor
    assert (ip.merge_size, ip.temporal_patch_size) == (real["image_processor"]["merge_size"],
                                                       real["image_processor"]["temporal_patch_size"])
    assert list(ip.image_mean) == real["image_processor"]["image_mean"]


def test_tiny_internvl_tokenizer_is_the_demo_teachers(tiny_models):
    """make demo builds the student with pipeline.models.tiny and copies the committed teacher: same token ids."""
    committed = REPO / "benchmarks/demo-teacher/tokenizer.json"
    assert (tiny_models["internvl", "student"] / "tokenizer.json").read_bytes() == committed.read_bytes()


@pytest.mark.parametrize("name,family", [("InternVL3-8B", "internvl"), ("Qwen2.5-VL-7B-Instruct", "qwen2_5_vl")])
def test_real_size_configs_carry_the_real_token_ids(name, family):
    config = real_config(name)
    for field, value in REAL[family]["config"].items():
        if field != "eos_token_id":
            assert getattr(config, field) == value, field


def _real_field_processors():
    """Both families' processors with the real image-processor fields and templates, on tiny tokenizers."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from pipeline.data.demo import vocabulary_corpus
    from pipeline.models.processors import PROCESSOR_CLASSES, build_tokenizer

    internvl, qwen = REAL["internvl"], REAL["qwen2_5_vl"]
    corpus = vocabulary_corpus()
    return {
        "internvl": PROCESSOR_CLASSES["internvl"](
            image_processor=GotOcr2ImageProcessorPil(**internvl["image_processor"]),
            tokenizer=build_tokenizer(corpus, "internvl"), image_seq_length=internvl["processor"]["image_seq_length"],
            chat_template=internvl["chat_template"]),
        "qwen2_5_vl": PROCESSOR_CLASSES["qwen2_5_vl"](
            image_processor=Qwen2VLImageProcessorPil(**qwen["image_processor"]),
            tokenizer=build_tokenizer(corpus, "qwen2_5_vl"), chat_template=qwen["chat_template"]),
    }


def test_real_fields_without_the_policy_give_many_tiles_and_tokens():
    """What the one-tile policy fixes: the real defaults on a 1600x900 frame."""
    processors = _real_field_processors()
    _, images = make_sample(1, size=(1600, 900))
    internvl = processors["internvl"]
    pixels = internvl(text=["<IMG_CONTEXT>\nx"], images=images, return_tensors="pt")["pixel_values"]
    assert pixels.shape[0] == 9  # crop_to_patches=True by default: 4x2 tiles of the 16:9 frame and a thumbnail
    qwen = processors["qwen2_5_vl"]
    grid = qwen.image_processor(images=images, return_tensors="pt")["image_grid_thw"][0]
    assert int(grid.prod()) // 4 > 1500  # ~1.8K vision tokens per frame


@pytest.mark.parametrize("family", ["internvl", "qwen2_5_vl"])
@pytest.mark.parametrize("n_views", [1, 6])
def test_real_fields_and_templates_under_the_one_tile_policy(family, n_views):
    from pipeline.attention.layout import IGNORE_INDEX, TilingPolicy, build_prompt

    processor = _real_field_processors()[family]
    tokenizer = processor.tokenizer
    record, images = make_sample(n_views, size=(1600, 900))
    lay = build_layout(record, images, processor)
    assert lay.tiling == TilingPolicy(tile_size=448)
    assert [end - start for start, end in lay.vision_spans] == [256] * n_views
    labelled = lay.labels != IGNORE_INDEX
    assert tokenizer.decode(lay.labels[labelled]) == record.answer + tokenizer.eos_token
    text = tokenizer.decode(lay.input_ids[: lay.vision_spans[0][0]])
    system = REAL[family]["default_system"]
    if system is None:
        assert text.startswith("<|im_start|>user\n")
    else:  # the default system turn comes first, as text, and is covered by the digest
        assert text.startswith(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n")
        processor.chat_template = processor.chat_template.replace(system, "Drive.")
        assert build_layout(record, images, processor).digest != lay.digest
        processor.chat_template = REAL[family]["chat_template"]
    prompt = build_prompt(record, images, processor, system="Be brief.")["input_ids"][0]
    assert tokenizer.decode(prompt).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert system is None or system not in tokenizer.decode(prompt)
