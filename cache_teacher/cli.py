"""Command line of the teacher-cache job (``python -m cache_teacher``)."""

from __future__ import annotations

import argparse
import json
import sys

from cache_teacher.run import CacheConfig, run
from cache_teacher.worker import CacheJobError
from pipeline.cache.codecs import CODECS, DEFAULT_CODEC
from schemas.method import SIGNALS

EPILOG = """\
examples:
  # tiny teacher, in this process (no Ray)
  python -m cache_teacher --teacher models/demo-teacher --data data/shards --out caches/demo-teacher --workers 0
  # InternVL3-38B on a node with 8 GPUs: 4 actors of 2 GPUs, pre-grouped for the 24-layer 1B student
  python -m cache_teacher --teacher InternVL3-38B --data data/shards --out caches/InternVL3-38B \\
      --workers 4 --gpus-per-worker 2 --student-layers 24 --codec quant
  # a planning-only teacher stores just its signal
  python -m cache_teacher --teacher InternVL3-8B --data data/shards --out caches/plan-8B --signals penult_tv

Re-running the same command resumes: committed shards are skipped, partial ones rewritten. A committed
shard that fails verification (`python -m cache_teacher.verify CACHE`) stops the job; add --repair to
re-cache it.
Open the result in a notebook with `from pipeline.cache.reader import open_cache`.
"""


def parse_args(argv: list[str] | None) -> CacheConfig:
    p = argparse.ArgumentParser(
        prog="python -m cache_teacher", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Run a teacher VLM once over WebDataset QA shards and store the head-averaged attention "
                    "slices the Drive-KD losses use (first-layer and penultimate-layer text-to-vision blocks, "
                    "intermediate full maps) in a Zarr v3 + Parquet cache, one cache shard per data shard.")
    p.add_argument("--teacher", required=True, help="teacher directory, or a known name looked up under $MODEL_DIR")
    p.add_argument("--data", required=True, help="shards directory written by `python -m pipeline.ingest`")
    p.add_argument("--out", required=True, help="cache directory (local path or fsspec URL such as s3://...)")
    p.add_argument("--signals", nargs="+", default=list(SIGNALS), choices=SIGNALS, metavar="SIGNAL",
                   help=f"signals to store, from {', '.join(SIGNALS)} (default: all)")
    p.add_argument("--mid-start", type=int, default=0, help="first intermediate layer (default 0)")
    p.add_argument("--mid-end", type=int, default=-2, help="last intermediate layer, inclusive (default -2 = L-2)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--student-layers", type=int, help="pre-group mid maps for a student of K decoder layers")
    group.add_argument("--student", help="student directory: sets K and checks its layout equals the teacher's")
    p.add_argument("--codec", default=DEFAULT_CODEC, choices=sorted(CODECS),
                   help="lossless: float16 + zstd; quant: uniform code, <1%% relative error per map; quant2: the same "
                        "bound, 2-D entropy stage (README 'Storage'); log8: 8-bit log-space code (default: %(default)s)")
    p.add_argument("--codec-param", action="append", default=[], metavar="KEY=VALUE",
                   help="a codec parameter (repeatable), VALUE read as JSON where it parses: e.g. quant2's "
                        "entropy=zstd (decodes ~20x faster, ~40%% larger) or entropy=rans (within ~4%% of the default's size, "
                        "decodes ~2-3x faster), entropy=tans (~6%% larger than rans, decodes 2-3x faster than rans), sink=true, "
                        "zstd_level=3, rel_error=0.0099, tv_rel_error=0.04 (the text-to-vision signals' own bound: "
                        "on real maps their blocks take 4.4x at 1%%, 7.2x at 3%%, 9.6x at 5%%; README 'Storage')")
    p.add_argument("--workers", type=int, default=1, help="Ray actors, each loads the teacher once; 0 = no Ray")
    p.add_argument("--gpus-per-worker", type=float, default=1.0,
                   help="GPUs per Ray actor, whatever this machine has (>1 shards the teacher; 0: CPU actors)")
    p.add_argument("--cpus-per-worker", type=float, default=0.5, help="CPUs reserved per actor")
    p.add_argument("--ray-address", help="existing Ray cluster address ('auto'); default: start a local Ray")
    p.add_argument("--batch-size", type=int, default=1, help="samples per forward (left-padded)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="teacher dtype (auto: bf16 when the workers get GPUs, else fp32); maps are always formed "
                        "in float32")
    p.add_argument("--overwrite", action="store_true", help="replace a cache made with different settings")
    p.add_argument("--repair", action="store_true",
                   help="re-cache committed shards that fail verification (every chunk is decoded to check)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow remote code for the teacher")
    args = p.parse_args(argv)
    params = {}
    for item in args.codec_param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            p.error(f"--codec-param {item!r}: write KEY=VALUE, e.g. entropy=zstd")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    args.codec_params = params
    del args.codec_param
    return CacheConfig(**{k: v for k, v in vars(args).items()})


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    try:
        manifest = run(config)
    except (ValueError, FileNotFoundError, OSError, CacheJobError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: committed shards are kept; re-run the same command to resume", file=sys.stderr)
        sys.exit(130)
    print(f"cache ready: {config.out} ({manifest.teacher['name']}, signals {', '.join(manifest.signals)})")
