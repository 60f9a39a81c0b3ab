"""Model factory, resolution and real-size configs."""

import subprocess
import sys

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
