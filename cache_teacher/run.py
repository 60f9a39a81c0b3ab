"""The teacher-cache job: ``python -m cache_teacher --teacher NAME_OR_PATH --data SHARDS --out CACHE``.

Reads top to bottom: config -> preflight (teacher, data, layers, layout, existing cache) -> the
shards still to do -> workers (Ray actors, or the driver itself with ``--workers 0``) -> report.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import platform
import posixpath
import sys
import time
from dataclasses import asdict, dataclass, field

import fsspec
import torch
import transformers
from tqdm import tqdm

from cache_teacher.verify import verify_cache
from cache_teacher.worker import CacheJobError, TeacherCacher, WorkerSettings, signal_plan
from pipeline.attention.layout import LAYOUT_VERSION, TilingPolicy, build_layout, default_tiling
from pipeline.cache.codecs import CODECS, DEFAULT_CODEC, get_codec
from pipeline.cache.format import committed_shards
from pipeline.cache.reader import open_cache
from pipeline.data.shards import iter_shard, read_manifest, shard_paths
from pipeline.models.load import resolve_model
from pipeline.models.processors import family_of, image_backend, load_processor
from schemas.cache import MANIFEST_NAME, CacheManifest, shard_files
from schemas.method import SIGNALS


@dataclass
class CacheConfig:
    """Settings of one cache job (all validated in ``validate``)."""

    teacher: str
    """teacher directory or known name (looked up under $MODEL_DIR)."""
    data: str
    """WebDataset shards directory written by pipeline.ingest."""
    out: str
    """cache directory (local path or fsspec URL)."""
    signals: list[str] = field(default_factory=lambda: list(SIGNALS))
    """signals to store: first_tv (perception), penult_tv (planning), mid (reasoning)."""
    mid_start: int = 0
    """first intermediate layer (negative counts from the end)."""
    mid_end: int = -2
    """last intermediate layer, inclusive."""
    student_layers: int | None = None
    """pre-group mid for a student of this many decoder layers (None: raw per-teacher-layer maps)."""
    student: str | None = None
    """student directory: its depth sets student_layers and its layout is checked against the teacher's."""
    codec: str = DEFAULT_CODEC
    """storage codec: lossless (float16 + zstd), quant (bounded-error uniform), quant2, log8."""
    codec_params: dict = field(default_factory=dict)
    """the codec's parameters (``--codec-param KEY=VALUE``), e.g. {"entropy": "zstd", "sink": True} for quant2."""
    workers: int = 1
    """Ray actors (each loads the teacher once); 0 runs in this process without Ray."""
    gpus_per_worker: float = 1.0
    """GPUs per Ray actor (>1 spreads a large teacher with a device map), whatever the driver has; 0 runs
    the actors on CPUs. With --workers 0 the driver is the worker and uses its own GPUs if any."""
    cpus_per_worker: float = 0.5
    """CPUs reserved per actor (fractional so small machines do not deadlock)."""
    ray_address: str | None = None
    """existing Ray cluster ('auto'); default starts a local Ray."""
    batch_size: int = 1
    """samples per forward (left-padded)."""
    dtype: str = "auto"
    """teacher weights dtype: bf16 | fp16 | fp32 | auto (bf16 on GPU, fp32 on CPU)."""
    overwrite: bool = False
    """replace an existing cache made with different settings."""
    repair: bool = False
    """re-cache committed shards that fail verification (deep: every chunk decoded)."""
    trust_remote_code: bool = False
    """allow remote code when loading the teacher (off by default)."""

    def validate(self) -> None:
        problems = []
        if not self.signals or set(self.signals) - set(SIGNALS):
            problems.append(f"--signals {self.signals}: choose from {list(SIGNALS)}")
        if self.codec not in CODECS:
            problems.append(f"--codec {self.codec!r}: choose from {sorted(CODECS)}")
        else:
            try:
                get_codec(self.codec, **self.codec_params)
            except ValueError as err:
                problems.append(f"--codec-param: {err}")
        if self.gpus_per_worker < 0:
            problems.append(f"--gpus-per-worker {self.gpus_per_worker} must be >= 0")
        if self.workers < 0 or self.batch_size < 1:
            problems.append(f"--workers {self.workers} must be >= 0 and --batch-size {self.batch_size} >= 1")
        if self.dtype not in ("auto", "bf16", "fp16", "fp32"):
            problems.append(f"--dtype {self.dtype!r}: choose from auto, bf16, fp16, fp32")
        if self.student and self.student_layers is not None:
            problems.append("give --student or --student-layers, not both")
        if self.student_layers is not None and self.student_layers < 2:
            problems.append(f"--student-layers {self.student_layers} must be >= 2")
        if problems:
            raise ValueError("invalid cache settings:\n  " + "\n  ".join(problems))


def _config_digest(model_dir) -> str:
    return hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()[:16]


def build_manifest(config: CacheConfig, teacher_dir, teacher_processor, student_dir, data_manifest) -> CacheManifest:
    """Resolve layers, tiling and codec into the manifest this run will write (or must match)."""
    text = transformers.AutoConfig.from_pretrained(teacher_dir).get_text_config()
    student_layers = config.student_layers
    if student_dir is not None:
        student_layers = transformers.AutoConfig.from_pretrained(student_dir).get_text_config().num_hidden_layers
    plan = signal_plan(text.num_hidden_layers, config.signals, mid_start=config.mid_start, mid_end=config.mid_end,
                       student_layers=student_layers)
    tiling = default_tiling(teacher_processor)
    dtype = config.dtype if config.dtype != "auto" else ("bf16" if worker_gpus(config) else "fp32")
    return CacheManifest(
        teacher={"name": teacher_dir.name, "path": str(teacher_dir), "family": family_of(teacher_dir),
                 "config_digest": _config_digest(teacher_dir), "num_layers": text.num_hidden_layers,
                 "num_heads": text.num_attention_heads},
        signals=plan, codec=get_codec(config.codec, **config.codec_params).describe(), dtype=dtype,
        layout={"layout_version": LAYOUT_VERSION, "tiling": tiling.describe(), "image_backend": image_backend(teacher_processor)},
        dataset={"dataset_digest": data_manifest.dataset_digest, "shards_dir": str(config.data),
                 "samples": data_manifest.num_samples},
        student_layers=student_layers,
        created={"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(), "user": getpass.getuser(),
                 "torch": torch.__version__, "transformers": transformers.__version__,
                 "command": " ".join(sys.argv)})


def check_layouts(config: CacheConfig, teacher_processor, student_dir, manifest: CacheManifest,
                  first_shard: str) -> None:
    """The teacher's processor lays out the first sample; the student's (if given) must agree."""
    sample = next(iter_shard(first_shard))
    tiling = TilingPolicy(**manifest.layout["tiling"])
    teacher = build_layout(sample.record, sample.images, teacher_processor, tiling=tiling)
    cached = None if config.overwrite else committed_digest(config.out, sample.key)
    if cached is not None and cached != teacher.digest:
        raise ValueError(
            f"sample {sample.key}: the teacher's processor lays it out with digest {teacher.digest}, but the "
            f"committed cache shards hold {cached}. The processor, tokenizer or tiling changed since the cache "
            "was started; use a new --out (or --overwrite) instead of resuming.")
    if student_dir is not None:
        student = build_layout(sample.record, sample.images, load_processor(student_dir), tiling=tiling)
        if student.digest != teacher.digest:
            raise ValueError(
                f"layout mismatch on sample {sample.key}: teacher digest {teacher.digest} "
                f"(S={teacher.seq_len}, vision={teacher.n_vision}) vs student {student.digest} "
                f"(S={student.seq_len}, vision={student.n_vision}). Likely cause: a different model family or "
                "tokenizer, or a different image tiling; distil within one family.")


def committed_digest(root: str, key: str) -> str | None:
    """Layout digest of ``key`` in the committed part of an existing cache, or None."""
    fs, path = fsspec.core.url_to_fs(root)
    if not fs.exists(posixpath.join(path, MANIFEST_NAME)) or 0 not in committed_shards(root):
        return None
    cache = open_cache(root)
    return cache[key].digest if key in cache else None


def prepare_output(config: CacheConfig, manifest: CacheManifest) -> None:
    """Write cache.json, or check an existing one matches (refuse unless --overwrite)."""
    fs, root = fsspec.core.url_to_fs(config.out)
    path = posixpath.join(root, MANIFEST_NAME)
    if fs.exists(path):
        existing = CacheManifest.from_json(json.loads(fs.cat_file(path)), source=path)
        diffs = existing.differences(manifest)
        if diffs and not config.overwrite and not committed_shards(config.out):
            # a job that stopped before committing any shard (e.g. no GPU for --gpus-per-worker 1): nothing to keep
            print(f"cache: {config.out} holds no committed shard; replacing its manifest (settings changed: "
                  f"{', '.join(diffs)})", file=sys.stderr)
        elif diffs and not config.overwrite:
            raise ValueError(f"{config.out} holds a cache made with different settings ({', '.join(diffs)}); "
                             "use another --out, or --overwrite to replace it")
        if not diffs:
            return
        fs.rm(root, recursive=True)
    try:
        fs.makedirs(root, exist_ok=True)
        with fs.open(path, "w") as handle:
            handle.write(manifest.dumps())
    except OSError as err:
        raise OSError(f"cannot write the cache manifest {path}: {err}. Choose a writable --out.") from err


def worker_gpus(config: CacheConfig) -> float:
    """GPUs each worker is given: --gpus-per-worker for Ray actors (the driver may have none, as on a
    cluster's head node); with --workers 0 the driver's own, if it has CUDA."""
    if config.workers == 0:
        return config.gpus_per_worker if torch.cuda.is_available() else 0.0
    return config.gpus_per_worker


def repair_or_refuse(config: CacheConfig) -> None:
    """Committed shards that fail verification stop the job, or with --repair are uncommitted (rewritten)."""
    fs, root = fsspec.core.url_to_fs(config.out)
    if config.overwrite or not fs.exists(posixpath.join(root, MANIFEST_NAME)):
        return
    damaged = verify_cache(config.out, deep=config.repair)
    if not damaged:
        return
    listing = "\n  - ".join(problem for problems in damaged.values() for problem in problems)
    if not config.repair:
        raise ValueError(f"committed shard(s) {sorted(damaged)} of {config.out} fail verification:\n  - {listing}\n"
                         "Re-run the same command with --repair to re-cache them.")
    for shard in damaged:
        fs.rm(posixpath.join(root, shard_files(shard)["marker"]))
    print(f"repair: re-caching damaged shard(s) {sorted(damaged)} of {config.out}", file=sys.stderr)


def worker_settings(config: CacheConfig, teacher_dir, manifest: CacheManifest) -> WorkerSettings:
    return WorkerSettings(teacher_dir=str(teacher_dir), dtype=manifest.dtype,
                          plan={k: asdict(v) for k, v in manifest.signals.items()}, codec=manifest.codec,
                          root=config.out, tiling=manifest.layout["tiling"], batch_size=config.batch_size,
                          gpus=worker_gpus(config), trust_remote_code=config.trust_remote_code)


def run_in_process(settings: WorkerSettings, todo: list, bar) -> list[dict]:
    cacher = TeacherCacher(settings)
    results = []
    for index, path, samples in todo:
        results.append(cacher.process_shard(index, path, samples, progress=bar.update))
        bar.set_postfix(shards=f"{len(results)}/{len(todo)}")
    return results


def run_with_ray(config: CacheConfig, settings: WorkerSettings, todo: list, bar) -> list[dict]:
    """An actor pool: each actor loads the teacher once; one task per data shard; metadata returned."""
    import ray
    from ray.util.queue import Queue

    try:
        ray.init(address=config.ray_address, include_dashboard=False, log_to_driver=True,
                 ignore_reinit_error=True, configure_logging=False)
    except Exception as err:  # Ray's start-up errors have no common base class
        where = f"the Ray cluster at {config.ray_address}" if config.ray_address else "a local Ray instance"
        raise CacheJobError(f"could not start {where}: {type(err).__name__}: {str(err).splitlines()[0][:300]}. "
                            "On a busy or single machine, --workers 0 caches in this process without Ray; "
                            "for a cluster, check --ray-address and that `ray status` answers.") from err
    try:
        available = ray.cluster_resources().get("GPU", 0)
        if settings.gpus > available:
            raise CacheJobError(f"--gpus-per-worker {settings.gpus}, but the Ray cluster has {available:g} GPU(s): no "
                                "actor could start. Pass --gpus-per-worker 0 to cache on CPUs (fp32), or join GPU "
                                "nodes to the cluster.")
        progress = Queue(actor_options={"num_cpus": 0})
        actor_cls = ray.remote(num_cpus=config.cpus_per_worker, num_gpus=settings.gpus)(TeacherCacher)
        idle = [actor_cls.remote(settings) for _ in range(min(config.workers, len(todo)))]
        queue, running, results = list(todo), {}, []
        while queue or running:
            while queue and idle:
                index, path, samples = queue.pop(0)
                actor = idle.pop()
                ref = actor.process_shard.remote(index, path, samples, progress=progress.put)
                running[ref] = (actor, index)
            done, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            bar.update(sum(progress.get_nowait_batch(progress.qsize())))
            for ref in done:
                actor, index = running.pop(ref)
                try:
                    results.append(ray.get(ref))  # re-raises the worker's error with shard and sample key
                except ray.exceptions.ActorDiedError as err:
                    raise CacheJobError(f"shard {index}: the worker died (killed, or out of memory): {err}. "
                                        "Committed shards are kept; re-run the same command to resume.") from err
                idle.append(actor)
                bar.set_postfix(shards=f"{len(results)}/{len(todo)}")
        bar.update(sum(progress.get_nowait_batch(progress.qsize())))
        return results
    finally:
        ray.shutdown()


def run(config: CacheConfig) -> CacheManifest:
    """Cache every data shard not yet committed. Returns the manifest."""
    config.validate()
    teacher_dir = resolve_model(config.teacher)
    data_manifest = read_manifest(config.data)
    paths = shard_paths(config.data)
    fs, _ = fsspec.core.url_to_fs(config.data)
    missing = [p for p in paths if not fs.exists(p)]
    if missing:
        raise FileNotFoundError(f"data shard(s) missing: {', '.join(missing)}; re-run pipeline.ingest")
    teacher_processor = load_processor(teacher_dir)
    student_dir = resolve_model(config.student) if config.student else None
    manifest = build_manifest(config, teacher_dir, teacher_processor, student_dir, data_manifest)
    repair_or_refuse(config)
    check_layouts(config, teacher_processor, student_dir, manifest, paths[0])
    prepare_output(config, manifest)
    done = committed_shards(config.out)
    todo = [(i, p, e.samples) for i, (p, e) in enumerate(zip(paths, data_manifest.shards)) if i not in done]
    layers = ", ".join(f"{name} {spec.layers[0]}..{spec.layers[-1]}" for name, spec in manifest.signals.items())
    print(f"cache {config.out}: {len(done)} shard(s) committed, {len(todo)} to do (partial ones are rewritten); "
          f"teacher {manifest.teacher['name']} ({manifest.teacher['num_layers']} layers); layers {layers}",
          file=sys.stderr)
    if todo:
        settings = worker_settings(config, teacher_dir, manifest)
        with tqdm(total=sum(t[2] for t in todo), unit="sample", desc="caching", dynamic_ncols=True) as bar:
            if config.workers == 0:
                run_in_process(settings, todo, bar)
            else:
                run_with_ray(config, settings, todo, bar)
    return manifest
