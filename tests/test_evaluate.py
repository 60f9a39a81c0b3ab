"""Evaluation: input formats, greedy answering, scoring rules, Table-1 aggregation and the CLI.

pipeline/evaluate.py and pipeline/scoring.py on tiny random models (their answers are noise, so the
tests check bookkeeping, never accuracy). A local ThreadingHTTPServer on 127.0.0.1 plays the judge;
no other network.
"""

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from conftest import localhost_server
from PIL import Image

from pipeline.data.demo import generate
from pipeline.data.ingest import ingest
from pipeline.data.shards import iter_samples
from pipeline.evaluation.choices import extract_choice, parse_options
from pipeline.evaluation.drivebench import DRIVEBENCH_CATEGORY_MAP, NUSCENES_CAMERAS
from pipeline.evaluation.evaluate import NEEDS_JUDGE, NO_REFERENCE_LETTER, EvalConfig, evaluate, open_data
from pipeline.evaluation.scoring import (
    Prediction,
    aggregate,
    load_scores,
    read_predictions,
    render_markdown,
    score_choice,
    write_predictions,
    write_scores,
)
from schemas.method import CAPABILITIES

REPO = Path(__file__).resolve().parents[1]
MC_QUESTION = "Which way is the car <c1,CAM_FRONT,0.5,0.5> going?\nA. Straight\nB. Left\nC. Right"


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Six demo records: the authors' JSON (demo/qa.json + images) and its ingested shards."""
    root = tmp_path_factory.mktemp("evaldata")
    generate(root / "demo", samples=6, seed=3)
    ingest(root / "demo" / "qa.json", root / "demo", root / "shards")
    return root


def _drivebench_record(category, question, answer, cameras, **extra):
    paths = {camera: f"samples/{camera}/frame0.jpg" for camera in cameras}
    return {"scene_token": "s1", "frame_token": "f1", "question": question, "answer": answer,
            "category": category, "img_paths": paths, **extra}


@pytest.fixture(scope="module")
def drivebench(tmp_path_factory):
    """A DriveBench-format file with images under root/nuscenes: 2 multiple-choice and 2 open questions."""
    root = tmp_path_factory.mktemp("drivebench")
    for index, camera in enumerate(NUSCENES_CAMERAS):
        (root / "nuscenes" / "samples" / camera).mkdir(parents=True)
        Image.new("RGB", (160, 90), (40 * index, 80, 120)).save(root / "nuscenes" / "samples" / camera / "frame0.jpg")
    records = [
        _drivebench_record("prediction", MC_QUESTION, "A. Straight", list(reversed(NUSCENES_CAMERAS))),
        _drivebench_record("perception", "What is in front of the ego car?", "A white truck.", ["CAM_FRONT"]),
        _drivebench_record("behavior", "Predict the ego behaviour. A. Stop. B. Go ahead.", "B. Go ahead.",
                           ["CAM_FRONT", "CAM_BACK"]),
        _drivebench_record("planning", "What should the ego car do next?", "Slow down and yield.", ["CAM_FRONT"]),
    ]
    path = root / "drivebench.json"
    path.write_text(json.dumps(records))
    return path


class _JudgeHandler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.requests.append(body)
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": "Partly right.\nScore: 70"}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data.encode())

    def log_message(self, *args):
        """Keep test output quiet."""


@pytest.fixture
def judge(monkeypatch):
    """URL of a local judge answering 'Score: 70' to everything; `.requests` records the request bodies."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with localhost_server(_JudgeHandler) as server:
        server.lock, server.requests = threading.Lock(), []
        yield server


def _recompute(report: Path) -> dict:
    """Capability -> score, straight from predictions.jsonl (letters re-read, not the stored verdicts)."""
    values = {capability: [] for capability in CAPABILITIES}
    for line in (report / "predictions.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["multiple_choice"]:
            options = parse_options(row["question"])
            correct = extract_choice(row["prediction"], options) == extract_choice(row["reference"], options)
            assert row["correct"] == correct
            values[row["capability"]].append(100.0 if correct else 0.0)
        elif row["score"] is not None:
            values[row["capability"]].append(row["score"])
    return {capability: sum(v) / len(v) if v else None for capability, v in values.items()}


def _check_scores_match_predictions(report: Path) -> dict:
    scores = load_scores(report)
    recomputed = _recompute(report)
    for capability in CAPABILITIES:
        assert scores["capabilities"][capability]["score"] == pytest.approx(recomputed[capability])
    present = [v for v in recomputed.values() if v is not None]
    assert scores["average"] == pytest.approx(sum(present) / len(present))
    return scores


# ---------------------------------------------------------------- end to end


def test_cli_on_shards_writes_reports_that_match_the_predictions(tiny_models, demo, tmp_path):
    report = tmp_path / "report"
    command = [sys.executable, "-m", "pipeline.evaluate", "--model", str(tiny_models["internvl", "student"]),
               "--data", str(demo / "shards"), "--out", str(report), "--max-new-tokens", "4", "--batch-size", "4",
               "--name", "tiny student", "--device", "cpu"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "| tiny student |" in result.stdout

    predictions = read_predictions(report / "predictions.jsonl")
    assert [p.key for p in predictions] == [sample.key for sample in iter_samples(demo / "shards")]
    assert all(p.multiple_choice and p.scored_by == "choice" and p.reference_choice for p in predictions)
    scores = _check_scores_match_predictions(report)
    assert scores["label"] == "tiny student"
    assert sum(stats["n"] for stats in scores["capabilities"].values()) == 6
    assert scores["run"]["data_format"] == "shards" and "category_map" not in scores
    assert "| tiny student |" in (report / "scores.md").read_text()
    assert json.loads((report / "config.json").read_text())["max_new_tokens"] == 4


def test_authors_json_input_gives_the_ingest_keys_and_raw_labels(tiny_models, demo, tmp_path):
    records = json.loads((demo / "demo" / "qa.json").read_text())
    records[0]["question_type"] = "Decision"  # an alias of planning
    qa_path = demo / "demo" / "qa_alias.json"
    qa_path.write_text(json.dumps(records))
    report = tmp_path / "report"
    scores = evaluate(EvalConfig(model=str(tiny_models["qwen2_5_vl", "student"]), data=str(qa_path), out=str(report),
                                 max_new_tokens=4, batch_size=3, limit=4, device="cpu"))

    predictions = read_predictions(report / "predictions.jsonl")
    shard_keys = [sample.key for sample in iter_samples(demo / "shards")]
    assert [p.key for p in predictions][1:] == shard_keys[1:4]  # the capability is part of the key
    assert (predictions[0].capability, predictions[0].source_category) == ("planning", "decision")
    assert all(p.question.count("<image>") >= 1 for p in predictions)
    assert scores["run"]["data_format"] == "qa_json"
    _check_scores_match_predictions(report)


def test_drivebench_input_without_judge_leaves_open_questions_unscored(tiny_models, drivebench, tmp_path):
    report = tmp_path / "report"
    scores = evaluate(EvalConfig(model=str(tiny_models["qwen2_5_vl", "student"]), data=str(drivebench),
                                 out=str(report), image_root=str(drivebench.parent / "nuscenes"),
                                 max_new_tokens=4, batch_size=4, device="cpu"))

    predictions = {p.source_category: p for p in read_predictions(report / "predictions.jsonl")}
    assert predictions["prediction"].question.startswith("<image>\n" * 6 + "Which way")
    assert predictions["prediction"].capability == "reasoning" and predictions["behavior"].capability == "planning"
    for category in ("perception", "planning"):
        assert (predictions[category].score, predictions[category].note) == (None, NEEDS_JUDGE)
    assert scores["category_map"] == DRIVEBENCH_CATEGORY_MAP
    perception = scores["capabilities"]["perception"]
    counts = ("n", "n_open", "n_open_scored", "n_unscored", "score")
    assert [perception[name] for name in counts] == [1, 1, 0, 1, None]
    assert scores["source_categories"]["behavior"]["n_mc"] == 1
    assert scores["average_over"] == ["reasoning", "planning"]
    assert "DriveBench categories mapped" in (report / "scores.md").read_text()
    _check_scores_match_predictions(report)


def test_judge_scores_open_questions_and_a_rerun_resumes_from_its_log(tiny_models, drivebench, judge, tmp_path):
    url = f"http://127.0.0.1:{judge.server_address[1]}/v1"
    config = EvalConfig(model=str(tiny_models["internvl", "student"]), data=str(drivebench), out=str(tmp_path),
                        image_root=str(drivebench.parent / "nuscenes"), judge_url=url, judge_model="stub",
                        max_new_tokens=4, device="cpu")
    scores = evaluate(config)

    predictions = read_predictions(tmp_path / "predictions.jsonl")
    open_ended = [p for p in predictions if not p.multiple_choice]
    assert len(open_ended) == 2 and all(p.score == 70.0 and p.scored_by == "judge" for p in open_ended)
    assert len(judge.requests) == 2 and all("<image>" not in str(body) for body in judge.requests)
    assert scores["capabilities"]["perception"]["open_score"] == 70.0
    planning = [p.score for p in predictions if p.capability == "planning"]
    assert scores["capabilities"]["planning"]["score"] == pytest.approx(sum(planning) / len(planning))
    _check_scores_match_predictions(tmp_path)

    assert evaluate(config)["capabilities"] == scores["capabilities"]
    assert len(judge.requests) == 2  # every open answer was already in judge_log.jsonl


def _released_record(question_type, question, answer, tag):
    """A record of DriveBench's released layout (question_type, image_path, integer tag)."""
    return {"scene_token": "s1", "frame_token": "f1", "question_type": question_type, "question": question,
            "answer": answer, "tag": tag,
            "image_path": {camera: f"samples/{camera}/frame0.jpg" for camera in NUSCENES_CAMERAS}}


def test_drivebench_released_layout_cli_like_for_like(tiny_models, drivebench, tmp_path):
    records = [_released_record("behavior", "Predict the ego behaviour. A. Stop. B. Go ahead.", "B", 0),
               _released_record("prediction", "Will <c1,CAM_FRONT,0.5,0.5> cross the road?", "No.", 3),
               _released_record("planning", "What should the ego car do next?", "Slow down.", 1)]
    path = tmp_path / "drivebench_released.json"
    path.write_text(json.dumps(records))
    report = tmp_path / "report"
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.evaluate", "--model", str(tiny_models["internvl", "student"]),
         "--data", str(path), "--image-root", str(drivebench.parent / "nuscenes"), "--out", str(report),
         "--max-new-tokens", "2", "--device", "cpu", "--camera-order", "drivebench", "--system-prompt", "drivebench"],
        cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    predictions = read_predictions(report / "predictions.jsonl")
    assert [(p.source_category, p.multiple_choice) for p in predictions] == [("behavior", True), ("planning", False)]
    run = json.loads((report / "config.json").read_text())
    assert run["data_settings"]["left_out"] == {"prediction yes/no (DriveBench leaves these out)": 1}
    assert run["data_settings"]["camera_order"][:2] == ["CAM_FRONT", "CAM_FRONT_LEFT"]
    assert run["system_text"].startswith("## Context\n\nYou are an autonomous driving agent")
    assert json.loads((report / "scores.json").read_text())["run"]["data_settings"] == run["data_settings"]


def test_system_prompt_is_the_first_turn(tiny_models):
    from conftest import make_sample

    from pipeline.attention.layout import build_prompt
    from pipeline.models.processors import load_processor

    processor = load_processor(tiny_models["internvl", "student"])  # its template has no default system turn
    record, images = make_sample(1)
    plain = build_prompt(record, images, processor)["input_ids"][0]
    with_system = build_prompt(record, images, processor, system="Drive safely.")["input_ids"][0]
    text = processor.tokenizer.decode(with_system)
    assert text.startswith("<|im_start|>system\nDrive safely.<|im_end|>")
    assert with_system[-plain.numel():].tolist() == plain.tolist()


def test_unknown_drivebench_category_names_the_option(tmp_path):
    path = tmp_path / "robust.json"
    path.write_text(json.dumps([_released_record("robust_qas", "Is the image foggy?", "Yes.", 2)]))
    with pytest.raises(ValueError, match="--map-category robust_qas=perception"):
        open_data(str(path))
    data = open_data(str(path), options=EvalConfig(model="m", data="d", out="o", device="cpu",
                                                   map_category=["robust_qas=perception"]).drivebench_options())
    assert data.category_map["robust_qas"] == "perception" and data.total == 1
    with pytest.raises(ValueError, match="write CATEGORY=CAPABILITY"):
        EvalConfig(model="m", data="d", out="o", map_category=["robust_qas"])


def test_missing_image_error_names_item_camera_and_fix(tmp_path):
    record = _drivebench_record("perception", "What is ahead?", "A car.", ["CAM_FRONT"], id="q7")
    path = tmp_path / "drivebench.json"
    path.write_text(json.dumps([record]))
    data = open_data(str(path), str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"item q7, camera CAM_FRONT.*--image-root"):
        next(data.items)


def test_config_reports_every_problem_with_the_fix():
    with pytest.raises(ValueError) as error:
        EvalConfig(model="m", data="d", out="o", judge_url="http://127.0.0.1:1", batch_size=0, dtype="int4")
    message = str(error.value)
    assert "--judge-model" in message and "batch_size must be >= 1" in message and "dtype 'int4'" in message
    with pytest.raises(ValueError, match="url must be an http"):  # checked before any answer is generated
        EvalConfig(model="m", data="d", out="o", judge_url="ftp://judge", judge_model="j")


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist. Fix: pass a shard folder"):
        open_data(str(tmp_path / "nope.json"))


# ---------------------------------------------------------------- scoring rules and aggregation


def _p(capability, *, mc=True, correct=None, judged=None, source=None, key=None):
    """A hand-made prediction: mc with correct True/False (None: no reference letter), or open judged/None."""
    fields = dict(key=key or f"{capability}-{mc}-{correct}-{judged}", capability=capability,
                  source_category=source or capability, question=MC_QUESTION if mc else "Why?",
                  reference="A. Straight", prediction="A", multiple_choice=mc)
    if mc and correct is not None:
        return Prediction(**fields, correct=correct, score=100.0 * correct, scored_by="choice")
    if not mc and judged is not None:
        return Prediction(**fields, score=judged, scored_by="judge")
    return Prediction(**fields, note=NO_REFERENCE_LETTER if mc else NEEDS_JUDGE)


def test_score_choice_reads_letters_against_the_options():
    assert score_choice(MC_QUESTION, "A. Straight", "The answer is A.").correct is True
    assert score_choice(MC_QUESTION, "A. Straight", "B").correct is False
    assert score_choice(MC_QUESTION, "Straight", "A").correct is True  # reference by option text
    assert score_choice(MC_QUESTION, "A. Straight", "a car turns").choice is None
    outcome = score_choice(MC_QUESTION, "I cannot tell", "A")
    assert (outcome.reference_choice, outcome.correct) == (None, None)


def test_aggregate_hand_computed_values():
    predictions = [_p("perception", correct=True, key="a"), _p("perception", correct=True, key="b"),
                   _p("perception", correct=False, key="c"),
                   _p("planning", mc=False, judged=80.0, key="d"), _p("planning", mc=False, judged=40.0, key="e")]
    scores = aggregate(predictions, model="m", label="run")
    assert scores["capabilities"]["perception"]["score"] == pytest.approx(200 / 3)
    assert scores["capabilities"]["planning"]["open_score"] == pytest.approx(60.0)
    assert scores["table"] == pytest.approx({"Perception": 200 / 3, "Reasoning": None, "Planning": 60.0,
                                             "Avg.": (200 / 3 + 60.0) / 2})


def test_aggregate_mixed_group_counts_and_missing_capability():
    predictions = [_p("perception", correct=True), _p("perception", correct=False), _p("perception", correct=None),
                   _p("perception", mc=False, judged=50.0), _p("perception", mc=False),
                   _p("planning", mc=False, key="p1"), _p("planning", mc=False, key="p2")]
    scores = aggregate(predictions, model="m", label="run")
    assert scores["capabilities"]["perception"] == {
        "n": 5, "n_mc": 3, "n_mc_scored": 2, "mc_accuracy": 50.0, "n_open": 2, "n_open_scored": 1,
        "open_score": 50.0, "n_scored": 3, "n_unscored": 2, "score": 50.0}
    assert scores["capabilities"]["reasoning"]["n"] == 0 and scores["capabilities"]["reasoning"]["score"] is None
    assert scores["capabilities"]["planning"]["n_unscored"] == 2 and scores["capabilities"]["planning"]["score"] is None
    assert (scores["average"], scores["average_over"]) == (50.0, ["perception"])
    markdown = render_markdown(scores)
    assert "| run | 50.00 | – | – | 50.00 |" in markdown and "Avg. is over perception only" in markdown
    assert "4 items are unscored" in markdown


def test_aggregate_all_unscored_gives_no_average():
    scores = aggregate([_p("reasoning", mc=False), _p("planning", correct=None)], model="m", label="run")
    assert scores["average"] is None and scores["average_over"] == []
    assert set(scores["table"].values()) == {None}
    assert "| run | – | – | – | – |" in render_markdown(scores)


def test_aggregate_per_drivebench_category():
    predictions = [_p("planning", correct=True, source="behavior", key="a"),
                   _p("planning", correct=False, source="planning", key="b")]
    scores = aggregate(predictions, model="m", label="run", category_map=DRIVEBENCH_CATEGORY_MAP)
    assert scores["source_categories"]["behavior"]["score"] == 100.0
    assert scores["source_categories"]["prediction"]["n"] == 0
    assert scores["capabilities"]["planning"]["score"] == 50.0


def test_predictions_and_scores_round_trip_and_refuse_other_versions(tmp_path):
    predictions = [_p("perception", correct=True), _p("planning", mc=False, judged=12.5)]
    write_predictions(predictions, tmp_path / "predictions.jsonl")
    assert read_predictions(tmp_path / "predictions.jsonl") == predictions
    scores = aggregate(predictions, model="m", label="run")
    write_scores(scores, tmp_path)
    assert load_scores(tmp_path) == scores
    (tmp_path / "scores.json").write_text(json.dumps({**scores, "version": 99}))
    with pytest.raises(ValueError, match="scores version 99"):
        load_scores(tmp_path)
    (tmp_path / "bad.jsonl").write_text(json.dumps({**predictions[0].to_json(), "version": 0}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl line 1: prediction version 0"):
        read_predictions(tmp_path / "bad.jsonl")


def test_prediction_rejects_inconsistent_scores():
    with pytest.raises(ValueError, match="a choice score must be 100"):
        Prediction(key="k", capability="perception", source_category="perception", question=MC_QUESTION,
                   reference="A", prediction="B", multiple_choice=True, correct=False, score=100.0, scored_by="choice")
    with pytest.raises(ValueError, match="outside 0-100"):
        Prediction(key="k", capability="planning", source_category="planning", question="Why?", reference="r",
                   prediction="p", multiple_choice=False, score=120.0, scored_by="judge")
