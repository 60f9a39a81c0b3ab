"""The student checkpoint contract: ``RUN_DIR/checkpoint-STEP/`` and the ``RUN_DIR/latest`` pointer.

A checkpoint directory holds the student (``save_pretrained`` + processor), ``trainer_state.pt``
(optimizer, scheduler, reweighting and RNG states) and ``meta.json``:
``{"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": {resolved config}, "loop": LoopState,
"calibration": CALIBRATION or null}``. CALIBRATION is the ``loss.scale=balanced`` record
``{"lambdas": {term: float}, "grad_norms": {term: float}, "ratios": {term: float}, "samples": int}`` (terms
ce, p, r, d; JSON floats round-trip exactly, so a resume applies the very lambdas of the first run); null
(or absent, in metas written before it existed) for ``loss.scale=reference``.
Readers refuse another format or version.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CHECKPOINT_FORMAT = "drive-kd/student-checkpoint"
CHECKPOINT_VERSION = 1
META_NAME, STATE_NAME, LATEST_NAME = "meta.json", "trainer_state.pt", "latest"
CALIBRATION_KEYS = ("lambdas", "grad_norms", "ratios", "samples")
LOGS = ("metrics.jsonl", "samples.jsonl")


@dataclass
class LoopState:
    """Where the loop stands; saved in meta.json."""

    step: int = 0
    """optimizer steps done."""
    epoch: int = 0
    """current epoch (== epochs when the run is complete)."""
    position: int = 0
    """samples of this epoch's rank stream already consumed (trained or skipped)."""
    samples: int = 0
    """samples trained in total."""
    skipped: int = 0
    """samples skipped in total (--skip-missing)."""
    log_bytes: dict = field(default_factory=lambda: {name: 0 for name in LOGS})
    """sizes of the run's JSONL logs at this point (a resume truncates them back)."""
