"""Evaluate a driving VLM on a QA set: greedy answers, multiple-choice accuracy, judge scores, Table 1.

``python -m pipeline.evaluate``: argument parsing and one call into pipeline.evaluation."""

from __future__ import annotations

import argparse
import sys

from pipeline.evaluation import efficiency
from pipeline.evaluation.drivebench import CAMERA_ORDERS, YES_NO_POLICIES
from pipeline.evaluation.evaluate import EvalConfig, evaluate
from pipeline.evaluation.judge import JudgeRequestError
from pipeline.evaluation.scoring import render_table
from pipeline.models.load import DTYPES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.evaluate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Answer a driving QA set with a VLM (greedy), score multiple choice by the option letter and "
                    "open-ended answers with an LLM judge, and report % per capability (Perception / Reasoning / "
                    "Planning / Avg., the Drive-KD paper's Table 1).",
        epilog="inputs (--data): a shard folder from `python -m pipeline.ingest`, an authors' QA JSON file, or a\n"
               "DriveBench JSON file (auto-detected: the released layout with question_type/image_path/tag, or the\n"
               "converted one with category/img_paths). Outputs in --out: predictions.jsonl, scores.json, scores.md,\n"
               "config.json, judge_log.jsonl (with --judge; a re-run resumes from it).\n\n"
               "DriveBench: tag 0 is multiple choice (scored by the option letter), tags 1/2/3 (planning/perception/\n"
               "prediction open-ended) go to the judge; prediction yes/no questions are left out as DriveBench does\n"
               "(--prediction-yes-no judge keeps them). Defaults: images in Drive-KD's training order, no system turn.\n"
               "Like-for-like with DriveBench: --camera-order drivebench --system-prompt drivebench.\n\n"
               "examples:\n"
               "  python -m pipeline.evaluate --model models/demo-student --data data/shards --out reports/student\n"
               "  python -m pipeline.evaluate --model InternVL3-1B --data drivebench_clean.json --image-root /data/nuscenes \\\n"
               "      --out reports/1b --judge http://127.0.0.1:8000/v1 --judge-model deepseek-v3.2\n"
               "  python -m pipeline.evaluate --model InternVL3-1B --data drivebench_robust.json --image-root /data \\\n"
               "      --out reports/1b-robust --map-category robust_qas=perception --camera-order drivebench\n\n"
               "deployment metrics: python -m pipeline.evaluate --efficiency --help")
    parser.add_argument("--model", required=True, help="model folder (save_pretrained) or known name under $MODEL_DIR")
    parser.add_argument("--data", required=True, help="shard folder, authors' QA JSON, or DriveBench JSON")
    parser.add_argument("--out", required=True, help="report folder")
    parser.add_argument("--image-root", help="folder the JSON image paths are relative to (default: the JSON's folder)")
    parser.add_argument("--judge", dest="judge_url", help="judge endpoint, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--judge-model", help="judge model name (required with --judge)")
    parser.add_argument("--judge-workers", type=int, default=4, help="concurrent judge requests (default 4)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="answer length limit (default 128)")
    parser.add_argument("--batch-size", type=int, default=4, help="questions per generate call (default 4)")
    parser.add_argument("--limit", type=int, help="answer only the first N questions")
    parser.add_argument("--name", help="label of the run in the tables (default: the model folder's name)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    bench = parser.add_argument_group("DriveBench input")
    bench.add_argument("--camera-order", choices=sorted(CAMERA_ORDERS), default="nuscenes",
                       help="image order: nuscenes (FRONT_LEFT, FRONT, FRONT_RIGHT, BACK_LEFT, BACK_RIGHT, BACK; "
                       "Drive-KD's training order, default) or drivebench (FRONT, FRONT_LEFT, FRONT_RIGHT, BACK, "
                       "BACK_LEFT, BACK_RIGHT)")
    bench.add_argument("--prediction-yes-no", choices=YES_NO_POLICIES, default="skip",
                       help="prediction yes/no questions: skip (DriveBench's rule, default) or judge")
    bench.add_argument("--map-category", action="append", default=[], metavar="CATEGORY=CAPABILITY",
                       help="map a further category to a capability, e.g. robust_qas=perception (repeatable)")
    bench.add_argument("--system-prompt", metavar="drivebench|FILE",
                       help="add a system turn: 'drivebench' (pipeline/evaluation/templates/drivebench_system.txt) "
                       "or a text file (default: none, the prompt the model was distilled with)")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--efficiency" in argv:
        efficiency.main([arg for arg in argv if arg != "--efficiency"], prog="python -m pipeline.evaluate --efficiency")
        return
    config_fields = vars(build_parser().parse_args(argv))
    try:
        scores = evaluate(EvalConfig(**config_fields))
    except (ValueError, FileNotFoundError, JudgeRequestError) as err:
        sys.exit(f"error: {err}")
    print(render_table([scores]), end="")
    unscored = sum(stats["n_unscored"] for stats in scores["capabilities"].values())
    print(f"{sum(stats['n'] for stats in scores['capabilities'].values())} questions, {unscored} unscored; "
          f"report in {config_fields['out']}")


if __name__ == "__main__":
    main()
