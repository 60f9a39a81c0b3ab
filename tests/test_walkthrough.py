"""The README's "Bring your data" walk-through, run as the README writes it, on fixtures in the real layouts.

The commands are read from the README's code block and run in order in a scratch folder: DriveLM-nuScenes
(v1_1 nested layout, six cameras per key frame, JPEGs of 1600x900 in a nuScenes-style root) -> the
authors' format -> shards -> check-model -> teacher cache -> student training -> DriveBench evaluation
(the released layout: `question_type`, `tag`, `image_path`; 1- and 6-view items, multiple choice and
open-ended) with a judge on 127.0.0.1. What differs from the README is named in `SUBSTITUTE` (the real
folders and endpoint) and `FAST` (options that keep the run to seconds on tiny models); the model names
resolve through MODEL_DIR to the session's tiny models. `python -m X ...` runs as `runpy` of module X with
that argv; `make check-model ...` runs the command `make -n` prints for it.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import shlex
import subprocess
import sys
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from conftest import localhost_server
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
CAMERAS = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")
"""The camera order of DriveLM's and DriveBench's `image_paths` objects."""
SCENE, FRAME, STAMP = "f0f120e4d4b0441da90ec53b16ee169d", "4a0798f849ca477ab18009c3a20b7df2", 1533151603512404
LOG = "n008-2018-08-01-15-16-36-0400"
FAST = {  # module -> options appended to the README's command
    "cache_teacher": ["--workers", "0"],
    "train_student": ["--max-steps", "1", "--set", "optim.grad_accum=2", "--set", "run.progress=false"],
    "pipeline.evaluate": ["--max-new-tokens", "3", "--limit", "3", "--batch-size", "3"],
    "pipeline.check_model": ["--no-memory"],
}


def nuscenes_path(camera: str) -> str:
    return f"samples/{camera}/{LOG}__{camera}__{STAMP}.jpg"


def write_nuscenes(root: Path) -> None:
    """One key frame's six camera JPEGs, 1600x900, where nuScenes keeps them."""
    for i, camera in enumerate(CAMERAS):
        path = root / nuscenes_path(camera)
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.new("RGB", (1600, 900), (80 + 10 * i, 90, 110))
        ImageDraw.Draw(image).rectangle([400 + 60 * i, 300, 900 + 60 * i, 700], fill=(200, 40, 40))
        image.save(path, quality=80)


def drivelm_qa() -> dict:
    """DriveLM-nuScenes v1_1 (OpenDriveLab/DriveLM v1_1_train_nus.json) layout, one scene, one key frame."""
    car = "<c1,CAM_FRONT,748.3,609.5>"
    empty = {"C": None, "con_up": None, "con_down": None, "cluster": None, "layer": None}
    qa = {
        "perception": [
            {"Q": "What are the important objects in the current scene?",
             "A": f"There is a red car to the front of the ego vehicle. The IDs of these objects are {car}.", **empty},
            {"Q": f"What is the moving status of object {car}? Please select the correct answer from the following "
                  "options: A. Turn right. B. Stopped. C. Going ahead. D. Back up.", "A": "C", **empty, "tag": [0]},
        ],
        "prediction": [
            {"Q": f"Would {car} be in the moving direction of the ego vehicle?", "A": "Yes.", **empty, "tag": [0]},
            {"Q": "What object should the ego vehicle notice first?",
             "A": f"Firstly, notice {car}. It is a car, so keep a safe distance.", **empty, "tag": [3]},
        ],
        "planning": [
            {"Q": f"What actions could the ego vehicle take based on {car}? Why take this action?",
             "A": "Keep going at the same speed, because there is no safety issue.", **empty, "tag": [1]},
        ],
        "behavior": [
            {"Q": "Predict the behavior of the ego vehicle. Please select the correct answer from the following "
                  "options: A. The ego vehicle is going straight. B. The ego vehicle is stopped.", "A": "A", **empty},
        ],
    }
    frame = {"key_object_infos": {car: {"Category": "Vehicle", "Status": "Moving", "Visual_description": "Red sedan.",
                                        "2d_bbox": [400.0, 300.0, 900.0, 700.0]}},
             "QA": qa, "image_paths": {camera: f"../nuscenes/{nuscenes_path(camera)}" for camera in CAMERAS}}
    return {SCENE: {"scene_description": "The ego vehicle drives along an urban road.", "key_frames": {FRAME: frame}}}


def drivebench_records() -> list[dict]:
    """DriveBench's released layout (drive-bench/arena): 6- and 1-view items, tags 0 to 3."""
    six = {camera: f"../nuscenes/{nuscenes_path(camera)}" for camera in CAMERAS}
    one = {"CAM_FRONT": six["CAM_FRONT"]}
    car = "<c1,CAM_FRONT,0.4677,0.6772>"
    base = {"scene_token": SCENE, "frame_token": FRAME}
    return [
        {**base, "question": f"What is the moving status of object {car}? Please select the correct answer from the "
                             "following options: A. Turn right. B. Stopped. C. Going ahead. D. Back up.",
         "answer": "C", "tag": 0, "question_type": "perception", "image_path": six},
        {**base, "question": "What are the important objects in the current scene?",
         "answer": "There is a red car to the front of the ego vehicle.", "tag": 2, "question_type": "perception",
         "image_path": one},
        {**base, "question": f"Would {car} be in the moving direction of the ego vehicle?", "answer": "Yes.",
         "tag": 3, "question_type": "prediction", "image_path": six},
        {**base, "question": "What actions could the ego vehicle take? Why take this action?",
         "answer": "Keep going at the same speed; there is no safety issue.", "tag": 1, "question_type": "planning",
         "image_path": six},
        {**base, "question": "Predict the behavior of the ego vehicle. Please select the correct answer from the "
                             "following options: A. The ego vehicle is going straight. B. The ego vehicle is stopped.",
         "answer": "A", "tag": 0, "question_type": "behavior", "image_path": one},
    ]


def readme_commands() -> list[str]:
    """The commands of the README's "Bring your data" code block, continuation lines joined, comments dropped."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split("## Bring your data", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands, current = [], ""
    for line in block.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            commands.append(current.strip())
            current = ""
    return commands


class Judge(BaseHTTPRequestHandler):
    """An OpenAI-compatible judge answering every request with a DriveBench-style scoring sheet."""

    def do_POST(self):  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers["Content-Length"]))
        reply = "1. Answer Correctness (40 points): 30\nTotal Score: 62\n\nBrief Summary: criterion 1 score: 30."
        body = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def run_command(command: str, substitute: dict[str, str], monkeypatch) -> None:
    command = re.sub(r"\$\(cat ([^)]+)\)", lambda m: Path(m.group(1)).read_text().strip(), command)
    argv = [substitute.get(arg, arg) for arg in shlex.split(command, comments=True)]
    if argv[0] == "make":
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}  # `make test`'s
        printed = subprocess.run(["make", "-n", "-s", "-C", str(REPO), *argv[1:]], capture_output=True, text=True,
                                 check=True, env=env).stdout.splitlines()
        argv = shlex.split([line for line in printed if " -m " in line][-1])  # after any venv set-up lines
        argv[0] = "python"
    assert argv[:2] == ["python", "-m"], command
    module, args = argv[2], argv[3:] + FAST.get(argv[2], [])
    monkeypatch.setattr(sys, "argv", [module, *args])
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        assert stop.code in (None, 0), f"{command}: {stop.code}"


def test_bring_your_data_as_the_readme_writes_it(tmp_path, tiny_models, monkeypatch, capsys):
    write_nuscenes(tmp_path / "nuscenes")
    (tmp_path / "v1_1_train_nus.json").write_text(json.dumps(drivelm_qa(), indent=4))
    (tmp_path / "drivebench_clean.json").write_text(json.dumps(drivebench_records(), indent=4))
    models = tmp_path / "models"
    models.mkdir()
    (models / "InternVL3-8B").symlink_to(tiny_models["internvl", "teacher"])
    (models / "InternVL3-1B").symlink_to(tiny_models["internvl", "student"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MODEL_DIR", str(models))
    commands = readme_commands()
    assert [c.split()[2] if c.startswith("python") else c.split()[1] for c in commands] == [
        "check-model", "pipeline.drivelm", "pipeline.ingest", "cache_teacher", "train_student", "pipeline.evaluate"]
    with localhost_server(Judge) as server:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        substitute = {"/data/nuscenes": str(tmp_path / "nuscenes"), "http://127.0.0.1:8000/v1": url}
        for command in commands:
            run_command(command, substitute, monkeypatch)
    out = capsys.readouterr().out
    assert "layout digests agree with the teacher's on both records" in out

    converted = json.loads((tmp_path / "data/drivelm_qa.json").read_text())
    assert len(converted["records"]) == 6 and converted["records"][0]["images"][1] == nuscenes_path("CAM_FRONT")
    assert "<c1,CAM_FRONT,0.4677,0.6772>" in converted["records"][0]["messages"][1]["content"]
    assert json.loads((tmp_path / "data/shards/manifest.json").read_text())["num_samples"] == 6
    assert (tmp_path / "caches/InternVL3-8B/cache.json").is_file()
    checkpoint = tmp_path / "runs/kd" / (tmp_path / "runs/kd/latest").read_text().strip()
    assert (checkpoint / "config.json").is_file()

    scores = json.loads((tmp_path / "reports/kd/scores.json").read_text())
    settings = scores["run"]["data_settings"]
    assert settings["left_out"] == {"prediction yes/no (DriveBench leaves these out)": 1}
    predictions = [json.loads(line) for line in (tmp_path / "reports/kd/predictions.jsonl").read_text().splitlines()]
    assert [p["question"].count("<image>") for p in predictions] == [6, 1, 6]  # the yes/no item is left out
    assert [p["multiple_choice"] for p in predictions] == [True, False, False]
    judged = [json.loads(line) for line in (tmp_path / "reports/kd/judge_log.jsonl").read_text().splitlines()]
    assert [entry["score"] for entry in judged] == [62.0, 62.0]  # the first Total Score, as DriveBench reads it
