"""Streaming training data: WebDataset shards joined with cached teacher maps, decoded in DataLoader workers.

A chain of small generator stages, each testable on plain lists::

    epoch_shards (seeded shard order) -> deal_streams (shard i to canonical stream i mod data.streams)
    -> rank_members (the epoch's positions interleave the streams round-robin; a rank reads only its own
    streams, whole shards, resuming at a position without decoding) -> for_worker (every num_workers-th
    of the rank's samples) -> decode -> SampleJoiner (layout, digest check, cached targets)

The epoch's sample order is fixed by the shards, the seed and ``data.streams``: it does not depend on the
world size (rank r of W reads the streams c with c mod W == r and takes their positions of the common
order) nor on the number of workers (worker w takes the rank's samples w, w + W, ... and the DataLoader's
round-robin over workers returns them in order). Optimizer step k of an epoch covers positions
``[k * grad_accum, (k + 1) * grad_accum)`` on however many ranks. Resuming an epoch at position p skips
p samples without decoding them, so a run killed and resumed trains every sample of the epoch exactly once.
"""

from __future__ import annotations

import math
import random
import tarfile
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

import fsspec
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.attention.layout import LAYOUT_VERSION, TilingPolicy, build_layout, default_tiling
from pipeline.cache.format import CacheIntegrityError
from pipeline.cache.reader import TeacherCache, open_cache
from pipeline.data.shards import Sample, ShardError, decode_sample, group_by_key, read_manifest, tar_members
from pipeline.models.processors import load_processor
from schemas.method import ROLE_SIGNAL, LayerPlan
from schemas.shards import MANIFEST_NAME


class DataError(ValueError):
    """Training data that cannot be used as given (the message names the sample/cache and the fix)."""


@dataclass(frozen=True)
class ShardRef:
    path: str
    samples: int


@dataclass
class TrainItem:
    """One sample ready for a micro-step (tensors on the CPU), or a skipped sample (``skipped`` set).

    inputs: the processor's batch-of-one model inputs; labels / is_vision: [S];
    targets: role -> cached target, perception/planning [n_text, n_vision], reasoning
    [k, S*(S+1)/2] (group means per student intermediate layer, packed lower triangles).
    """

    key: str
    index: int
    """position in the epoch's sample order (common to all ranks)."""
    capability: str = ""
    inputs: dict = field(default_factory=dict)
    labels: torch.Tensor | None = None
    is_vision: torch.Tensor | None = None
    answer_start: int = 0
    targets: dict = field(default_factory=dict)
    skipped: str | None = None

    def pin_memory(self) -> TrainItem:
        """Called by the DataLoader's pinning thread (page-locked host memory for async copies)."""
        return replace(self, inputs={k: v.pin_memory() for k, v in self.inputs.items()},
                       targets={k: v.pin_memory() for k, v in self.targets.items()})


# ---------------------------------------------------------------- stages
def epoch_shards(shards: list[ShardRef], *, epoch: int, seed: int, shuffle: bool) -> list[ShardRef]:
    """The shard order of ``epoch``: seeded per epoch, or as listed."""
    order = list(shards)
    if shuffle:
        random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def deal_streams(order: list[ShardRef], streams: int) -> list[list[ShardRef]]:
    """Shard i of ``order`` to canonical stream ``i mod streams`` (streams beyond the shard count stay empty)."""
    return [order[c::streams] for c in range(streams)]


def interleave(lengths: list[int]) -> Iterator[int]:
    """The stream of each epoch position: round-robin over the streams that still have samples.

    ``lengths``: samples per stream. ``interleave([2, 1, 3]) -> 0 1 2 0 2 2``."""
    for k in range(max(lengths, default=0)):
        yield from (c for c, n in enumerate(lengths) if n > k)


def numbered_members(shards: Iterable[ShardRef], *, start: int = 0) -> Iterator[tuple[int, str, dict, str]]:
    """(position in ``shards``, key, {member: bytes}, shard path) from ``start`` on; earlier samples are not
    decoded and whole shards before ``start`` are not opened. Checks each shard's sample count."""
    index = 0
    for shard in shards:
        if index + shard.samples <= start:
            index += shard.samples
            continue
        count = 0
        try:
            stream = fsspec.open(shard.path, "rb").open()
        except FileNotFoundError as err:
            raise ShardError(f"shard {shard.path} does not exist. Fix: re-run `python -m pipeline.ingest`.") from err
        with stream:
            for key, files in group_by_key(tar_members(stream, shard.path), shard.path):
                if index >= start:
                    yield index, key, files, shard.path
                index += 1
                count += 1
        if count != shard.samples:
            raise ShardError(f"shard {shard.path} holds {count} samples, its manifest says {shard.samples}: the "
                             "file is truncated or was replaced. Fix: re-run `python -m pipeline.ingest`.")


def rank_members(streams: list[list[ShardRef]], owned: Iterable[int], *,
                 start: int = 0) -> Iterator[tuple[int, str, dict, str]]:
    """(epoch position, key, {member: bytes}, shard path) of the positions from ``start`` on that fall in
    the ``owned`` streams, in position order; only the owned streams' shards are opened."""
    lengths = [sum(s.samples for s in stream) for stream in streams]
    schedule = list(interleave(lengths))
    before = [0] * len(streams)
    for c in schedule[:start]:
        before[c] += 1
    readers = {c: numbered_members(streams[c], start=before[c]) for c in owned if lengths[c] > before[c]}
    for position in range(start, len(schedule)):
        reader = readers.get(schedule[position])
        if reader is not None:
            _, key, files, path = next(reader)
            yield position, key, files, path
    for reader in readers.values():  # past each stream's last sample: its last shard's count check
        deque(reader, maxlen=0)


def for_worker(stream: Iterable[tuple], *, worker: int, num_workers: int) -> Iterator[tuple]:
    """Items ``worker, worker + num_workers, ...`` of ``stream``."""
    return (item for j, item in enumerate(stream) if j % num_workers == worker)


def decode(stream: Iterable[tuple[int, str, dict, str]]) -> Iterator[tuple[int, Sample]]:
    for index, key, files, path in stream:
        yield index, decode_sample(key, files, path)


# ---------------------------------------------------------------- the cache join
@dataclass
class SampleJoiner:
    """Lays a sample out for the student and attaches the cached targets of each role.

    caches: role -> cache (one cache object may serve several roles); k: number of intermediate
    student layers; grouped: whether the reasoning cache is pre-grouped for this student.
    """

    student: str
    tiling: TilingPolicy
    caches: dict[str, TeacherCache]
    k: int = 0
    grouped: bool = False
    skip_missing: bool = False
    processor: object = None

    def __call__(self, index: int, sample: Sample) -> TrainItem:
        for role, cache in self.caches.items():
            if sample.key not in cache:
                if self.skip_missing:
                    return TrainItem(key=sample.key, index=index, skipped=f"missing from the {role} cache {cache.root}")
                raise DataError(f"sample {sample.key} (shard {sample.shard}) is missing from the {role} cache "
                                f"{cache.root}. Fix: finish/re-run the cache job on the same --data, or pass "
                                "--skip-missing to skip (and count) such samples.")
        if self.processor is None:
            self.processor = load_processor(self.student)
        layout = build_layout(sample.record, sample.images, self.processor, tiling=self.tiling)
        targets, entries = {}, {}
        for role, cache in self.caches.items():
            entry = entries.setdefault(id(cache), cache[sample.key])
            if entry.digest != layout.digest:
                raise DataError(
                    f"layout mismatch on sample {sample.key}: student digest {layout.digest} (S={layout.seq_len}, "
                    f"vision={layout.n_vision}) vs {role} cache {cache.root} digest {entry.digest} "
                    f"(S={entry.layout.get('seq_len')}, vision={entry.layout.get('n_vision')}). Likely cause: a "
                    "teacher of another family/tokenizer, or a different image tiling; cache a teacher of the "
                    "student's family with the same tiling.")
            try:
                targets[role] = self._target(entry, role)
            except CacheIntegrityError as err:  # names cache, shard, signal, sample and the fix
                raise DataError(f"{role} cache: {err}") from err
        return TrainItem(key=sample.key, index=index, capability=sample.record.capability,
                         inputs=layout.model_inputs, labels=layout.labels, is_vision=layout.is_vision,
                         answer_start=layout.answer_span[0], targets=targets)

    def _target(self, entry, role: str):
        """A float32 tensor, or (codec quant2) a DeviceTarget: codes that dequantise (and group) on the
        device the micro-step moves them to."""
        if role == "reasoning":
            return entry.target("mid", group=None if self.grouped else self.k)
        return entry.target(ROLE_SIGNAL[role])


# ---------------------------------------------------------------- dataset and loader
@dataclass
class DataSource:
    """Everything the workers need (picklable): the shards, the joiner and the split settings.

    ``rank`` / ``world``: this process among the data-parallel ranks (``run.parallel=ddp``; 0 / 1 otherwise);
    it reads the canonical streams ``c`` with ``c mod world == rank``."""

    shards: list[ShardRef]
    joiner: SampleJoiner
    seed: int = 42
    shuffle: bool = True
    streams: int = 8
    rank: int = 0
    world: int = 1

    def epoch_streams(self, epoch: int) -> list[list[ShardRef]]:
        return deal_streams(epoch_shards(self.shards, epoch=epoch, seed=self.seed, shuffle=self.shuffle),
                            self.streams)

    def owned(self) -> list[int]:
        """This rank's canonical streams."""
        return list(range(self.rank, self.streams, self.world))

    def epoch_samples(self, epoch: int) -> int:
        """Samples of the epoch on all ranks together."""
        return sum(s.samples for s in self.shards)

    def rank_samples(self, epoch: int) -> int:
        streams = self.epoch_streams(epoch)
        return sum(s.samples for c in self.owned() for s in streams[c])


class TrainStream(IterableDataset):
    """One epoch of the rank's stream from epoch position ``start``, split over the DataLoader workers."""

    def __init__(self, source: DataSource, *, epoch: int, start: int = 0):
        self.source, self.epoch, self.start = source, epoch, start

    def __iter__(self) -> Iterator[TrainItem]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        members = rank_members(self.source.epoch_streams(self.epoch), self.source.owned(), start=self.start)
        mine = for_worker(members, worker=worker, num_workers=num_workers)
        for index, sample in decode(mine):
            yield self.source.joiner(index, sample)


def make_loader(source: DataSource, *, epoch: int, start: int, num_workers: int, pin_memory: bool) -> DataLoader:
    """A DataLoader yielding TrainItems one by one, in stream order."""
    return DataLoader(TrainStream(source, epoch=epoch, start=start), batch_size=None, num_workers=num_workers,
                      pin_memory=pin_memory, prefetch_factor=2 if num_workers else None)


# ---------------------------------------------------------------- preflight
def data_shards(shards_dir: str) -> tuple[list[ShardRef], str]:
    """The shard list and dataset digest of an ingested shard set; DataError if it holds no sample."""
    manifest = read_manifest(shards_dir)
    if manifest.num_samples == 0:
        raise DataError(f"{shards_dir}/{MANIFEST_NAME} lists no samples: the shard set is empty. Fix: ingest a QA "
                        "file with at least one usable record (`python -m pipeline.ingest`).")
    root = str(shards_dir).rstrip("/")
    return [ShardRef(f"{root}/{e.name}", e.samples) for e in manifest.shards if e.samples], manifest.dataset_digest


def check_cache(roles: list[str], cache: TeacherCache, *, family: str, num_layers: int, k: int,
                dataset_digest: str, skip_missing: bool) -> list[str]:
    """Problems that make ``cache`` unusable for ``roles`` with this student (DESIGN contract 4)."""
    m, where = cache.manifest, f"{'/'.join(roles)} cache {cache.root}"
    problems = []
    for role in roles:
        signal = ROLE_SIGNAL[role]
        if signal not in m.signals:
            problems.append(f"{where} stores no {signal!r} signal for the {role} term (stored: {sorted(m.signals)});"
                            f" re-create it with `python -m cache_teacher ... --signals {signal}` or drop {role} "
                            "from --signals")
    if m.teacher.get("family") != family:
        problems.append(f"{where} comes from teacher {m.teacher.get('name')} of family {m.teacher.get('family')}, "
                        f"the student is {family}: layouts differ across families; cache a {family} teacher")
    if m.layout.get("layout_version") != LAYOUT_VERSION:
        problems.append(f"{where} has layout version {m.layout.get('layout_version')}, this trainer builds "
                        f"version {LAYOUT_VERSION}; re-create the cache with this code version")
    spec = m.signals.get("mid")
    if "reasoning" in roles and spec is not None and spec.groups is not None and (
            m.student_layers != num_layers or len(spec.groups) != k):
        problems.append(f"{where} is pre-grouped for a student of {m.student_layers} layers ({len(spec.groups)} "
                        f"intermediate maps); this student has {num_layers} layers and {k} intermediate layers "
                        "in loss.mid_start..mid_end. Re-create it with --student for this student, or without "
                        "pre-grouping")
    if len(cache) == 0:
        problems.append(f"{where} has no committed shard; let the cache job finish (re-run it to resume)")
    if m.dataset.get("dataset_digest") != dataset_digest and not skip_missing:
        problems.append(f"{where} was made from another dataset (digest {str(m.dataset.get('dataset_digest'))[:16]}"
                        f" vs {dataset_digest[:16]} of --data); samples would be missing. Use the cache of this "
                        "data, or --skip-missing to train on the samples both have")
    return problems


def shard_keys(shard: ShardRef) -> Iterator[str]:
    """Sample keys of a data shard from its tar headers only (member data is seeked over, not read)."""
    try:
        with fsspec.open(shard.path, "rb") as stream, tarfile.open(fileobj=stream, mode="r:") as tar:
            yield from (info.name.rpartition("/")[2].partition(".")[0] for info in tar if info.isfile())
    except (tarfile.TarError, EOFError, FileNotFoundError) as err:
        raise ShardError(f"shard {shard.path} cannot be listed ({err}). Fix: re-run `python -m pipeline.ingest`.") from err


def skip_everything(shards: list[ShardRef], caches: dict[str, TeacherCache], digest: str) -> list[str]:
    """With --skip-missing: a problem for each cache that holds none of the data's samples (the run
    would skip every sample and save the untrained student)."""
    problems = []
    for cache in dict.fromkeys(caches.values()):
        if cache.manifest.dataset.get("dataset_digest") == digest:
            continue  # the cache was made from this data: its committed samples are present
        if not any(key in cache for shard in shards for key in shard_keys(shard)):
            roles = "/".join(r for r, c in caches.items() if c is cache)
            problems.append(f"{roles} cache {cache.root} holds none of the {sum(s.samples for s in shards)} samples "
                            "of --data: --skip-missing would skip every sample and train nothing. Use the cache "
                            "made from this data (or cache it: `python -m cache_teacher --data ...`)")
    return problems


def split_problems(shards: list[ShardRef], *, streams: int, world: int, where: str) -> list[str]:
    """Why ``shards`` cannot be split over ``world`` data-parallel ranks reading whole streams."""
    problems = []
    if streams % world:
        problems.append(f"data.streams={streams} is not a multiple of the {world} data-parallel ranks: set "
                        f"--set data.streams={streams * world // math.gcd(streams, world)} (any multiple of the "
                        "world size; the sample order depends on data.streams, not on the world size)")
    if len(shards) < world:
        problems.append(f"{where} has {len(shards)} non-empty shard(s) for {world} data-parallel ranks; re-ingest "
                        "with a smaller --shard-size so every rank reads a shard")
    return problems


def open_source(config, *, student_dir: str, family: str, num_layers: int, rank: int = 0,
                world: int = 1) -> DataSource:
    """Validate data and caches against the student (every problem in one DataError) and describe
    the stream. ``config`` is the resolved TrainConfig, ``student_dir`` the student's directory,
    ``rank`` / ``world`` this process among the data-parallel ranks."""
    shards, digest = data_shards(config.data.shards)
    split = split_problems(shards, streams=config.data.streams, world=world, where=config.data.shards)
    if split:
        raise DataError("cannot split the data over the ranks:\n  - " + "\n  - ".join(split))
    k = len(LayerPlan.for_model(num_layers, config.loss.mid_start, config.loss.mid_end).mid)
    caches, problems = {}, []
    for directory in dict.fromkeys(config.data.caches.values()):
        roles = [r for r, d in config.data.caches.items() if d == directory]
        try:
            cache = open_cache(directory)
        except (FileNotFoundError, ValueError) as err:
            problems.append(f"{'/'.join(roles)} cache: {err}")
            continue
        caches.update({role: cache for role in roles})
        problems += check_cache(roles, cache, family=family, num_layers=num_layers, k=k, dataset_digest=digest,
                                skip_missing=config.data.skip_missing)
    tilings = {tuple(sorted(c.manifest.layout["tiling"].items())) for c in caches.values()}
    if len(tilings) > 1:
        problems.append(f"the caches were laid out with different tilings {sorted(tilings)}; use caches made "
                        "with one tiling")
    if config.data.skip_missing and not problems:
        problems += skip_everything(shards, caches, digest)
    if problems:
        raise DataError("cannot train with these caches:\n  - " + "\n  - ".join(problems))
    tiling = (TilingPolicy(**dict(tilings.pop())) if tilings
              else default_tiling(load_processor(student_dir)))
    spec = next((c.manifest.signals.get("mid") for r, c in caches.items() if r == "reasoning"), None)
    joiner = SampleJoiner(student=student_dir, tiling=tiling, caches=caches, k=k,
                          grouped=spec is not None and spec.groups is not None,
                          skip_missing=config.data.skip_missing)
    return DataSource(shards=shards, joiner=joiner, seed=config.run.seed, shuffle=config.data.shuffle_shards,
                      streams=config.data.streams, rank=rank, world=world)
