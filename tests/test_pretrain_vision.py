"""Vision pretraining of the tiny models: token labels from the scene model, what it trains, the CLI."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from pipeline.data.scenes import FRONT, sample_scene
from pipeline.models.__main__ import main
from pipeline.models.load import load_model
from pipeline.models.pretrain_vision import HEADS, Settings, run, token_labels

HEAD = {name: i for i, name in enumerate(HEADS)}


def _scene(**spec):
    return sample_scene(random.Random(3), "s", (FRONT,), **spec)


def test_token_labels_name_what_each_cell_shows():
    scene = _scene(light="red", sign="stop", lead="stopped", crossing=False, left_busy=False, right_busy=False,
                   sidewalk=0)
    labels = token_labels(scene, FRONT, 7).reshape(len(HEADS), 7, 7)
    (lead,) = scene.in_camera(FRONT)
    row, col = int(lead.y * 7), int(lead.x * 7)  # the cell of the body's centre pixel
    assert HEADS["kind"][labels[HEAD["kind"], row, col]] == lead.kind
    assert HEADS["colour"][labels[HEAD["colour"], row, col]] == lead.colour
    assert HEADS["lane"][labels[HEAD["lane"], row, col]] == "ego"
    assert HEADS["motion"][labels[HEAD["motion"], row, col]] == "stopped"
    assert HEADS["light"][labels[HEAD["light"], 1, 6]] == "red"  # LIGHT_BOX spans x 0.80-0.94, y 0.02-0.38
    assert HEADS["sign"][labels[HEAD["sign"], 1, 0]] == "stop"  # sign centre (0.12, 0.20)
    assert labels[:, 6, 0].tolist() == [0] * len(HEADS)  # bottom-left: road, nothing on it
    # a cell shows one thing: object heads are none where the light is, and the light head none on the lead
    assert labels[HEAD["kind"], 1, 6] == 0 and labels[HEAD["light"], row, col] == 0


def test_token_labels_of_an_empty_camera_are_all_none():
    scene = _scene(light=None, sign=None, lead=None, crossing=False, left_busy=False, right_busy=False, sidewalk=0)
    assert token_labels(scene, FRONT, 7).sum() == 0


def test_internvl_image_tokens_are_row_major_cells(tiny_models):
    """The labels assume token k covers cell (k // 7, k % 7): check InternVL's pixel shuffle keeps that order."""
    model = load_model(tiny_models[("internvl", "teacher")])
    grid = torch.zeros(1, 14, 14, 2)
    grid[0, :, :, 0] = torch.arange(14)[:, None].float()  # patch row
    grid[0, :, :, 1] = torch.arange(14)[None, :].float()  # patch column
    merged = model.model.pixel_shuffle(grid, scale_factor=0.5).reshape(49, 4, 2)  # [token, patch, (row, col)]
    for k in range(49):
        assert set(merged[k, :, 0].long().tolist()) == {2 * (k // 7), 2 * (k // 7) + 1}
        assert set(merged[k, :, 1].long().tolist()) == {2 * (k % 7), 2 * (k % 7) + 1}


@pytest.mark.parametrize("family", ["internvl", "qwen2_5_vl"])
def test_pretraining_trains_the_vision_side_only_and_saves_a_loadable_model(tiny_models, tmp_path, family):
    source = tiny_models[(family, "teacher")]
    out = tmp_path / "out"
    report = run(source, out, Settings(scenes=12, steps=3, batch=4, heldout=4), progress=False)
    before, after = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    vision = {name for name in before if "vision" in name or "visual" in name or "projector" in name}
    assert changed and changed <= vision, sorted(changed - vision)
    assert json.loads((out / "vision_pretrain.json").read_text())["heldout_accuracy"].keys() == HEADS.keys()
    assert report["grid"] == 7 and report["settings"]["steps"] == 3
    assert (out / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    load_model(out)


def test_cli_names_a_directory_without_a_model(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["pretrain-vision", "--model", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "no config.json there" in capsys.readouterr().err


def test_cli_rejects_a_non_positive_count(tiny_models, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["pretrain-vision", "--model", str(tiny_models[("internvl", "teacher")]), "--out", str(tmp_path),
              "--steps", "0"])
    assert "--steps must be >= 1" in capsys.readouterr().err
