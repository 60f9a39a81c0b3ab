"""pipeline.check_model on tiny checkpoints: the report, the CLI, and the errors for unusable directories."""

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.data.demo import vocabulary_corpus
from pipeline.models.check import captured_layers, check_model, check_tokenizer, render
from pipeline.models.processors import build_tokenizer, family_of, load_processor

REPO = Path(__file__).resolve().parents[1]


def test_report_of_teacher_and_student(tiny_models):
    report = check_model(tiny_models["internvl", "teacher"], student=tiny_models["internvl", "student"],
                         device="cpu")
    model = report["model"]
    assert (model["family"], model["layers"], model["heads"], model["image_backend"]) == ("internvl", 6, 8, "pil")
    assert model["vision_tokens_per_image"] == 49 and model["tiling"] == {"tile_size": 112, "max_tiles": 1}
    one, six = report["layouts"]["1-view"], report["layouts"]["6-view"]
    assert len(one["vision_spans"]) == 1 and len(six["vision_spans"]) == 6 and six["n_vision"] == 6 * 49
    assert one["answer_span"][1] == one["S"] - 1  # the answer and <|im_end|>; the final newline is unlabelled
    assert report["student"]["digests_agree"] and report["student"]["digests"]["6-view"] == six["digest"]
    capture = report["capture"]
    assert capture["layers"] == captured_layers(6) == [0, 1, 2, 3, 4]
    assert capture["map_shape"] == [one["S"], one["S"]] and capture["finite"] and capture["max_row_sum_error"] < 1e-5
    assert report["memory"]["seq_len"] == six["S"] and report["memory"]["cache_forward_peak_gib"] > 0
    text = render(report)
    assert "49 vision tokens per image" in text and "digests agree" in text


def test_cli_qwen_with_shards(tiny_models, tiny_shards):
    result = subprocess.run([sys.executable, "-m", "pipeline.check_model", str(tiny_models["qwen2_5_vl", "teacher"]),
                             "--data", str(tiny_shards), "--no-capture", "--no-memory", "--json"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model"]["family"] == "qwen2_5_vl" and "capture" not in report and "memory" not in report
    for name, views in (("1-view", 1), ("6-view", 6)):  # the generated set has both: taken from the shards
        assert not report["layouts"][name]["key"].startswith("check-")
        assert len(report["layouts"][name]["vision_spans"]) == views


def test_remote_code_internvl_names_the_hf_repository(tmp_path):
    model_dir = tmp_path / "InternVL3-8B"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "internvl_chat", "architectures": ["InternVLChatModel"],
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                     "AutoModel": "modeling_internvl_chat.InternVLChatModel"}}))
    with pytest.raises(ValueError, match=r"remote-code checkpoint.*OpenGVLab/InternVL3-8B-hf"):
        family_of(model_dir)


def test_another_family_and_cross_family_student(tmp_path, tiny_models):
    llava = tmp_path / "llava"
    llava.mkdir()
    (llava / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ValueError, match="model_type 'llava' is not supported"):
        check_model(llava)
    with pytest.raises(ValueError, match="is a qwen2_5_vl model, the teacher a internvl one"):
        check_model(tiny_models["internvl", "teacher"], student=tiny_models["qwen2_5_vl", "student"],
                    capture=False, memory=False)


def test_tokenizer_without_image_tokens(tmp_path):
    processor = SimpleNamespace(tokenizer=build_tokenizer(vocabulary_corpus()[:20], "qwen2_5_vl", vocab_size=300))
    with pytest.raises(ValueError, match=r"no image tokens \['<img>', '</img>', '<IMG_CONTEXT>'\]"):
        check_tokenizer(tmp_path, "internvl", processor)


def test_student_with_another_template_is_a_digest_mismatch(tmp_path, tiny_models):
    student = tmp_path / "student"
    shutil.copytree(tiny_models["internvl", "student"], student)
    template = student / "chat_template.jinja"
    template.write_text("{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}" + template.read_text())
    with pytest.raises(ValueError, match=r"1-view record check-1view: teacher layout digest .* Likely cause"):
        check_model(tiny_models["internvl", "teacher"], student=student, capture=False, memory=False)


# ---------------------------------------------------------------- checkpoints with the real processor fields

REAL = json.loads((REPO / "tests/fixtures/hf_checkpoint_configs.json").read_text(encoding="utf-8"))


def _real_layout_checkpoint(out: Path, family: str, role: str) -> Path:
    """A tiny LM whose vision side and processor are the real checkpoint's: 448 px, patch 14, the real
    image-processor fields (InternVL3-hf: crop_to_patches defaults, 256 tokens; Qwen2.5-VL: 3136..12845056
    pixels) and template (Qwen's default system turn)."""
    import torch
    from transformers import AutoModelForImageTextToText
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from pipeline.models.tiny import _tiny_internvl, _tiny_qwen

    real = REAL[family]
    tokenizer = build_tokenizer(vocabulary_corpus(), family)
    if family == "internvl":
        config, processor = _tiny_internvl(tokenizer, role)
        config.vision_config.image_size, config.vision_config.patch_size = [448, 448], [14, 14]
        config.image_seq_length = processor.image_seq_length = real["processor"]["image_seq_length"]
        processor.image_processor = GotOcr2ImageProcessorPil(**real["image_processor"])
    else:
        config, processor = _tiny_qwen(tokenizer, role)
        config.vision_config.patch_size = real["image_processor"]["patch_size"]
        processor.image_processor = Qwen2VLImageProcessorPil(**real["image_processor"])
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(config).save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.mark.parametrize("family", ["internvl", "qwen2_5_vl"])
def test_real_processor_fields_give_256_tokens_per_image(tmp_path, family):
    teacher = _real_layout_checkpoint(tmp_path / "teacher", family, "teacher")
    student = _real_layout_checkpoint(tmp_path / "student", family, "student")
    report = check_model(teacher, student=student, device="cpu", memory=False)
    model = report["model"]
    assert model["vision_tokens_per_image"] == 256 and model["tiling"] == {"tile_size": 448, "max_tiles": 1}
    one, six = report["layouts"]["1-view"], report["layouts"]["6-view"]
    assert six["n_vision"] == 6 * 256 and report["student"]["digests_agree"]
    assert one["answer_span"][1] == one["S"] - 1 and report["capture"]["finite"]
    tokenizer = load_processor(teacher).tokenizer
    head = {"internvl": "<|im_start|>user\n<img>",
            "qwen2_5_vl": f"<|im_start|>system\n{REAL[family]['default_system']}<|im_end|>\n<|im_start|>user\n"
                          "<|vision_start|>"}[family]
    assert one["vision_spans"][0][0] == len(tokenizer(head, add_special_tokens=False)["input_ids"])
