"""pipeline's stage of ``make bench-gpu`` (``pipeline.measure.gpu`` runs it):

    python -m pipeline.measure.gpu_stages --stage efficiency --device cuda --out-dir D [--budget-s 120] [--tiny]

  efficiency  deployment metrics of the 1B and 8B shapes, 6 views, batch 1, 8 prompts x 64 new tokens:
              tokens/s, TTFT, peak GiB (pipeline.evaluation.efficiency)

Writes ``D/efficiency_<gpu>.json`` (``pipeline.measure.gpu_common.stage_main``); exit status 1 when the
stage failed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from pipeline.evaluation import efficiency
from pipeline.measure.gpu_common import Plan, StageRun, stage_main


def efficiency_report(source: str, plan: Plan, device: torch.device) -> dict:
    kind = {"model": source} if Path(source).is_dir() else {"real_shape": source}
    return efficiency.measure(efficiency.EfficiencyConfig(
        **kind, views=plan.efficiency_views, prompts=plan.prompts, max_new_tokens=plan.max_new_tokens,
        device=str(device), allow_cpu=True))


def stage_efficiency(run: StageRun, plan: Plan, device: torch.device) -> dict:
    for role, source in zip(("student", "large"), plan.deploy):
        run.run(role, efficiency_report, source, plan, device)
    return {"models": dict(zip(("student", "large"), plan.deploy))}


STAGES = {"efficiency": stage_efficiency}


def main(argv: list[str] | None = None) -> int:
    return stage_main("pipeline.measure.gpu_stages", STAGES, argv, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
