"""What the study runs: the budgets, the student rows as trainer overrides, and the seeds of each split.

Every student row is one entry of ROWS: the trainer flags that make it, on top of the budget's student
config. `drive-kd` is the candidate recommended settings (RECOMMENDED); every other row names exactly what it
changes. The single-term rows route every sample's mix row to one term (the paper's
single-teacher protocol: one signal over all the data).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from schemas.method import CAPABILITIES, TERMS, UNIFORM_MIX

STUDY_CONFIGS = "train_student/configs"
SINGLE_TERM = {"perception": [1.0, 0.0, 0.0], "reasoning": [0.0, 1.0, 0.0], "planning": [0.0, 0.0, 1.0]}


def _mix_all_to(capability: str) -> list[str]:
    """--set flags that route the mix rows of every sample capability to one term and switch the other
    terms off (lambda 0), so that a balanced calibration sees only the term that trains."""
    weights = SINGLE_TERM[capability]
    off = [f"--set=loss.lam_{term}=0" for term, weight in zip(TERMS, weights) if weight == 0]
    return _mix_flags(dict.fromkeys(CAPABILITIES, tuple(weights))) + off


def _mix_flags(mix: dict[str, tuple[float, float, float]]) -> list[str]:
    """--set flags that give every capability row of the mixing matrix."""
    return [f"--set=loss.mix.{row}={list(mix[row])}" for row in CAPABILITIES]


RECOMMENDED_LOSS = ["--set=loss.scale=balanced", "--set=loss.kind=kl"]
RECOMMENDED = [*RECOMMENDED_LOSS, *_mix_flags(UNIFORM_MIX)]
"""The recommended settings: balanced scale (each attention term's weighted gradient calibrated to half of
CE's on the first window, train_student/scale.py), per-row KL between attention distributions, and the
uniform mix (every term on every sample, a third each). Chosen on the development seeds 0-2 (README, "The
study": the grid of settings measured there); the table of record is on seeds the choice never saw. The
flags stay explicit so that the rows mean the same whatever the trainer's defaults. Every Drive-KD variant
below starts from these flags (the single-term rows from RECOMMENDED_LOSS, with a mix of their own)."""

ROWS: dict[str, list[str]] = {
    "sft": ["--sft"],
    "drive-kd": RECOMMENDED,
    "drive-kd-reference": ["--reference"],  # METHOD sections 3-6 exactly (train_student's REFERENCE_FLAGS)
    "no-agp": [*RECOMMENDED, "--no-agp"],
    **{f"single-{capability}": [*RECOMMENDED_LOSS, *_mix_all_to(capability)] for capability in CAPABILITIES},
}
"""Student row name -> trainer flags added to the budget's student config."""


@dataclass(frozen=True)
class Budget:
    """Sizes of one study run. Samples are QA records (one generated scene each)."""

    teacher_samples: int
    """records of the teacher's training split (drawn once per study)."""
    teacher_captions: int
    """scene descriptions added to the teacher's split (pipeline.demo_data --captions; make demo-teacher's
    TEACHER_CAPTIONS): dense supervision; the committed demo teacher's recipe has as many as QA records."""
    student_samples: int
    """records of each seed's student training split (smaller: the regime where a teacher helps)."""
    eval_samples: int
    """records of the held-out split every model is scored on."""
    teacher_config: str
    """trainer YAML of the teacher's CE fine-tuning."""
    student_config: str
    """trainer YAML shared by every student row (same steps for all)."""
    teacher_steps: int | None = None
    """cap on the teacher's optimizer steps (None: the config's epochs)."""
    student_steps: int | None = None
    """cap on each student's optimizer steps (None: the config's epochs)."""
    teacher_vision_steps: int = 3000
    """vision pretraining steps of a teacher trained here (python -m pipeline.models pretrain-vision; make
    demo-teacher's TEACHER_VISION_STEPS); 0: none."""
    teacher_vision_scenes: int = 6000
    """scenes of that vision pretraining (their own seeded stream, never a QA split's scenes)."""
    student_vision_steps: int = 0
    """vision pretraining steps of each seed's student before its rows (stream "vision/{seed}"); 0: the
    students start random-initialised."""
    student_vision_scenes: int = 3000
    """scenes of each student's vision pretraining."""
    teacher: str | None = None
    """an already trained teacher to reuse instead of training one (None: train it on the teacher split)."""

    def to_dict(self) -> dict:
        return asdict(self)


BUDGETS = {
    "tiny": Budget(teacher_samples=12, teacher_captions=2, student_samples=8, eval_samples=6,
                   teacher_config=f"{STUDY_CONFIGS}/demo-teacher.yaml",
                   student_config=f"{STUDY_CONFIGS}/study-student.yaml", teacher_steps=1, student_steps=1,
                   teacher_vision_steps=2, teacher_vision_scenes=8, student_vision_steps=2, student_vision_scenes=8),
    "quick": Budget(teacher_samples=16000, teacher_captions=16000, teacher_vision_steps=3000,
                    teacher_vision_scenes=6000, student_samples=400, eval_samples=300,
                    teacher_config=f"{STUDY_CONFIGS}/demo-teacher.yaml",
                    student_config=f"{STUDY_CONFIGS}/study-student.yaml", student_steps=200,
                    teacher="benchmarks/demo-teacher"),
    "full": Budget(teacher_samples=16000, teacher_captions=16000, teacher_vision_steps=3000,
                   teacher_vision_scenes=6000, student_samples=400, eval_samples=300,
                   teacher_config=f"{STUDY_CONFIGS}/demo-teacher.yaml",
                   student_config=f"{STUDY_CONFIGS}/study-student.yaml", teacher="benchmarks/demo-teacher"),
}
"""tiny: the suite's end-to-end test (one step per model). quick and full reuse the committed demo teacher
(`make demo-teacher`: vision pretraining, then trained once on its own split of 16000 QA scenes and 16000
scene descriptions, seed 100; ~30 min on 2 cores, which is why the study does not train it again;
`--teacher DIR` or `Budget(teacher=None)` trains or picks another).
quick: one seed, every student row capped at 200 optimizer steps (half the config's 4 epochs), about
12 minutes on 2 cores. full: the config's 4 epochs over 400 scenes (400 optimizer steps of 4 samples) for
every row, 3 or more seeds in about an hour."""

TEACHER_DATA_SEED = 1_000_000
"""Scene seed of the teacher's split; far from any student seed, so the splits never share a seed."""
EVAL_DATA_SEED = 2_000_000
"""Scene seed of the held-out split, fixed for the study so every row is scored on the same questions."""
