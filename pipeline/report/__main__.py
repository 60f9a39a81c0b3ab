"""The run report: ``python -m pipeline.report`` writes ``REPORT_DIR/report.md`` and its PNGs.

``python -m pipeline.report``: argument parsing and one call into pipeline.report.report."""

from __future__ import annotations

import argparse

from pipeline.report.report import _pairs, write_report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example: python -m pipeline.report --out reports/demo "
                                       "--eval teacher=reports/demo/eval-teacher --eval drive-kd=reports/demo/eval-kd "
                                       "--run drive-kd=runs/demo-kd --cache caches/demo-teacher "
                                       "--model teacher=models/demo-teacher --data data/shards-eval")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--eval", action="append", default=[], metavar="LABEL=DIR", help="evaluation output dir")
    p.add_argument("--run", action="append", default=[], metavar="LABEL=DIR", help="training run dir")
    p.add_argument("--cache", help="teacher cache directory")
    p.add_argument("--model", action="append", default=[], metavar="LABEL=DIR", help="model for the overlays")
    p.add_argument("--data", help="shards the overlay samples come from (held-out split)")
    p.add_argument("--per-capability", type=int, default=2, help="overlay samples per capability")
    p.add_argument("--title", default="")
    p.add_argument("--study", metavar="STUDY_MD",
                   help="a study.md of make study to include and link (e.g. benchmarks/results/study/study.md)")
    args = p.parse_args(argv)
    path = write_report(out=args.out, evals=_pairs(args.eval, "--eval"), runs=_pairs(args.run, "--run"),
                        cache=args.cache, models=_pairs(args.model, "--model"), data=args.data,
                        per_capability=args.per_capability, title=args.title,
                        study=args.study)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
