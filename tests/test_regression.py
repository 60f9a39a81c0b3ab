"""Stored-figure regression: a 2-step CPU Drive-KD run on a fixed tiny set-up must reproduce its per-term
losses, so that a change of the method's semantics (a layer index, a mask, a mean, a weight) cannot pass
unnoticed.

Set-up: the seeded tiny InternVL teacher and student (tests/conftest.py ``tiny_models``), four hand-written
single-view QA records (drawn images, one capability each in turn), ingested, cached by the real cache job,
trained by the real CLI with the REFERENCE loss settings (``loss.scale=reference``, MSE attention losses,
lambdas 1, AGP and reweighting on, the reference mix) for 2 optimizer steps of 2 micro-steps.

To regenerate after an INTENDED change of semantics (or of the tiny-model factory, pipeline/models/tiny.py):
run ``.venv/bin/python -m pytest tests/test_regression.py -q``, copy the ``measured={...}`` dict its
failure message prints into STORED, and say in the commit why the figures changed.
"""

import json
import math

from PIL import Image, ImageDraw

from pipeline.data.ingest import ingest
from train_student.metrics import read_jsonl
from train_student.train import main

REL_TOL = 1e-4
"""Relative tolerance per value: CPU float32 reruns agree to ~1e-7; a semantic change moves a term by far more."""
STORED = {  # step -> raw mean loss per term over the step's window (metrics.jsonl "losses")
    1: {"ce": 6.378614902496338, "p": 5.400899993901476e-08, "r": 5.9248897343877616e-08, "d": 3.480534260802415e-08},
    2: {"ce": 6.262451171875, "p": 5.3013238243693195e-08, "r": 5.358953814038614e-08, "d": 3.100121404031597e-08},
}
RECORDS = (
    ("perception", "What colour is the car ahead?\nA. Red\nB. Blue", "A. Red <c1,CAM_FRONT,0.4678,0.6772>"),
    ("reasoning", "Will the pedestrian cross?\nA. Yes\nB. No", "A. Yes, it walks toward the lane."),
    ("planning", "What should the ego vehicle do?\nA. Brake\nB. Accelerate", "A. Brake for the car ahead."),
    ("perception", "How many cars are visible?\nA. One\nB. Two", "B. Two <c2,CAM_FRONT,0.2100,0.5500>"),
)


def write_qa(root):
    """The four records in the authors' released format, with drawn 160x120 images."""
    records = []
    for i, (capability, question, answer) in enumerate(RECORDS):
        image = Image.new("RGB", (160, 120), (90, 90, 90))
        ImageDraw.Draw(image).rectangle([10 + 20 * i, 40, 60 + 20 * i, 90], fill=(220, 30 + 50 * i, 30))
        image.save(root / f"img{i}.png")
        records.append({"messages": [{"role": "user", "content": f"<image>\n{question}"},
                                     {"role": "assistant", "content": answer}],
                        "images": [f"img{i}.png"], "question_type": capability})
    (root / "qa.json").write_text(json.dumps(records), encoding="utf-8")
    return root / "qa.json"


def test_two_step_drive_kd_losses_match_the_stored_values(tiny_models, tmp_path):
    from cache_teacher.run import CacheConfig, run

    (tmp_path / "qa").mkdir()
    ingest(write_qa(tmp_path / "qa"), tmp_path / "qa", tmp_path / "shards", shard_size=4)
    teacher, student = tiny_models["internvl", "teacher"], tiny_models["internvl", "student"]
    run(CacheConfig(teacher=str(teacher), data=str(tmp_path / "shards"), out=str(tmp_path / "cache"), workers=0))
    main(["--student", str(student), "--data", str(tmp_path / "shards"), "--cache", str(tmp_path / "cache"),
          "--out", str(tmp_path / "run"), "--max-steps", "2", "--set", "run.progress=false",
          "--set", "data.num_workers=0", "--set", "optim.grad_accum=2", "--reference", "--set", "run.device=cpu"])
    measured = {row["step"]: row["losses"] for row in read_jsonl(tmp_path / "run" / "metrics.jsonl")}
    assert set(measured) == set(STORED), f"measured steps {sorted(measured)}"
    for step, terms in STORED.items():
        assert set(measured[step]) == set(terms), f"step {step}: terms {sorted(measured[step])}"
        off = {t: (measured[step][t], v) for t, v in terms.items()
               if not math.isclose(measured[step][t], v, rel_tol=REL_TOL, abs_tol=0.0)}
        assert not off, f"step {step}: (measured, stored) differ beyond rel {REL_TOL}: {off}; measured={measured}"
