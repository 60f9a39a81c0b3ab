"""Streaming data: shard order, canonical streams and the rank split, resume positions, worker- and
world-size-independent order, the cache join."""

import json

import numpy as np
import pytest
import torch

from pipeline.attention.layout import LAYOUT_VERSION, build_layout, default_tiling
from pipeline.attention.maps import group_mean
from pipeline.cache.codecs import DEFAULT_CODEC, get_codec
from pipeline.cache.reader import open_cache
from pipeline.cache.writer import CacheShardWriter
from pipeline.data.shards import ShardError, iter_samples
from pipeline.models.processors import load_processor
from schemas.cache import MANIFEST_NAME, CacheManifest, SignalSpec
from schemas.method import SIGNALS
from train_student.data import (
    DataError,
    DataSource,
    SampleJoiner,
    ShardRef,
    check_cache,
    data_shards,
    deal_streams,
    epoch_shards,
    for_worker,
    interleave,
    make_loader,
    numbered_members,
    rank_members,
    split_problems,
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from pipeline.data.demo import generate
    from pipeline.data.ingest import ingest

    root = tmp_path_factory.mktemp("data")
    generate(root / "demo", samples=7, seed=3, views="1")
    ingest(root / "demo" / "qa.json", root / "demo", root / "shards", shard_size=3)
    return root / "shards"


class FakeCache:
    """The reader API the joiner uses: ``in``, ``[key]``, ``len``, ``root``, ``manifest``."""

    def __init__(self, entries, manifest=None, root="fake-cache"):
        self.entries, self.manifest, self.root = entries, manifest, root

    def __contains__(self, key):
        return key in self.entries

    def __getitem__(self, key):
        return self.entries[key]

    def __len__(self):
        return len(self.entries)


def write_cache(root, samples, processor, *, n_mid: int, seed: int = 0, wrong_digest=(), leave_out=()) -> dict:
    """A real cache (manifest + one committed shard, ``pipeline.cache.writer``) of random maps shaped like
    the samples' layouts; values are float16-exact so the lossless codec returns them unchanged.
    Returns key -> the blocks written."""
    rng = np.random.default_rng(seed)
    exact = lambda *shape: rng.random(shape, dtype=np.float32).astype(np.float16).astype(np.float32)  # noqa: E731
    (root / MANIFEST_NAME).parent.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST_NAME).write_text(manifest(codec=get_codec(DEFAULT_CODEC).describe()).dumps())
    written = {}
    with CacheShardWriter(root=str(root), index=0, codec=get_codec(DEFAULT_CODEC), signals=list(SIGNALS)) as writer:
        for sample in samples:
            if sample.key in leave_out:
                continue
            lay = build_layout(sample.record, sample.images, processor)
            blocks = {"first_tv": exact(lay.n_text, lay.n_vision), "penult_tv": exact(lay.n_text, lay.n_vision),
                      "mid": exact(n_mid, lay.seq_len * (lay.seq_len + 1) // 2)}
            digest = "0123456789abcdef" if sample.key in wrong_digest else lay.digest
            writer.add({"key": sample.key, "shard": 0, "capability": sample.record.capability,
                        "seq_len": lay.seq_len, "n_text": lay.n_text, "n_vision": lay.n_vision, "layout_digest": digest,
                        "layout": json.dumps(lay.summary(), separators=(",", ":"))}, blocks)
            written[sample.key] = blocks
        writer.commit()
    return written


def test_epoch_shards_seeded_order_and_streams():
    refs = [ShardRef(f"s{i}", 1) for i in range(10)]
    first = epoch_shards(refs, epoch=0, seed=42, shuffle=True)
    assert first == epoch_shards(refs, epoch=0, seed=42, shuffle=True)
    assert first != epoch_shards(refs, epoch=1, seed=42, shuffle=True) and sorted(first, key=lambda r: r.path) == refs
    assert epoch_shards(refs, epoch=0, seed=42, shuffle=False) == refs
    streams = deal_streams(refs, 4)
    assert [[r.path for r in st] for st in streams] == [["s0", "s4", "s8"], ["s1", "s5", "s9"], ["s2", "s6"], ["s3", "s7"]]
    assert deal_streams(refs[:2], 4)[2:] == [[], []]
    assert list(interleave([2, 1, 3])) == [0, 1, 2, 0, 2, 2] and list(interleave([0, 2])) == [1, 1]
    assert list(interleave([])) == []


def test_split_problems_name_the_fix():
    refs = [ShardRef(f"s{i}", 1) for i in range(3)]
    assert split_problems(refs, streams=8, world=2, where="D") == []
    text = " ".join(split_problems(refs, streams=8, world=3, where="D"))
    assert "data.streams=8 is not a multiple of the 3" in text and "--set data.streams=24" in text
    assert "D has 3 non-empty shard(s) for 4 data-parallel ranks" in split_problems(refs, streams=8, world=4, where="D")[0]


def test_numbered_members_resume_and_truncation(shards):
    refs, _ = data_shards(str(shards))
    full = [(i, key) for i, key, _, _ in numbered_members(refs)]
    assert [i for i, _ in full] == list(range(7))
    assert [(i, key) for i, key, _, _ in numbered_members(refs, start=4)] == full[4:]
    unopened = [ShardRef(str(shards / "no-such-shard.tar"), 3), *refs[1:]]
    assert [i for i, *_ in numbered_members(unopened, start=3)] == [3, 4, 5, 6]  # the missing shard is never opened
    with pytest.raises(ShardError, match="holds 3 samples, its manifest says 4"):
        list(numbered_members([ShardRef(refs[0].path, 4)]))
    assert [x[0] for x in for_worker(iter([(5,), (6,), (7,), (8,), (9,)]), worker=1, num_workers=2)] == [6, 8]


def test_rank_members_take_their_positions_of_one_order(shards):
    """Ranks reading their own streams together yield the one-rank order; a resume starts mid-stream."""
    refs, _ = data_shards(str(shards))  # 3 + 3 + 1 samples
    streams = deal_streams(refs, 4)
    whole = [(i, key) for i, key, _, _ in rank_members(streams, range(4))]
    assert [i for i, _ in whole] == list(range(7)) and len({key for _, key in whole}) == 7
    first = [s.key for s in iter_samples(shards)]
    assert [key for _, key in whole] == [first[j] for j in (0, 3, 6, 1, 4, 2, 5)]  # round-robin over the shards
    ranks = [[(i, key) for i, key, _, _ in rank_members(streams, range(r, 4, 2))] for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == whole and [i for i, _ in ranks[1]] == [1, 4, 6]
    assert [(i, key) for i, key, _, _ in rank_members(streams, [0, 2], start=3)] == [p for p in ranks[0] if p[0] >= 3]
    unopened = deal_streams([refs[0], ShardRef(str(shards / "no-such-shard.tar"), 3), refs[2]], 4)
    assert [i for i, *_ in rank_members(unopened, [0, 2])] == [0, 2, 3, 5]  # stream 1's shard is never opened


def test_stream_order_does_not_depend_on_workers(shards, tiny_models):
    student = str(tiny_models["internvl", "student"])
    refs, _ = data_shards(str(shards))
    joiner = SampleJoiner(student=student, tiling=default_tiling(load_processor(student)), caches={})
    source = DataSource(shards=refs, joiner=joiner, seed=1)
    orders = {workers: [(item.index, item.key) for item in make_loader(source, epoch=0, start=2, num_workers=workers,
                                                                        pin_memory=False)]
              for workers in (0, 2)}
    assert orders[0] == orders[2] and [i for i, _ in orders[0]] == list(range(2, 7))
    assert len({key for _, key in orders[0]}) == 5


def test_join_targets_digest_check_and_missing_samples(shards, tiny_models, tmp_path):
    student = str(tiny_models["internvl", "student"])
    processor = load_processor(student)
    samples = list(iter_samples(shards))
    written = write_cache(tmp_path / "cache", samples, processor, n_mid=5, wrong_digest={samples[1].key},
                          leave_out={samples[2].key})
    cache = open_cache(str(tmp_path / "cache"))
    joiner = SampleJoiner(student=student, tiling=default_tiling(processor), caches={
        "perception": cache, "reasoning": cache, "planning": cache}, k=3)
    item = joiner(0, samples[0])
    blocks = written[samples[0].key]
    assert item.capability == samples[0].record.capability and item.labels.shape == item.is_vision.shape
    n_vision = int(item.is_vision.sum())
    assert item.targets["perception"].shape == (item.is_vision.numel() - n_vision, n_vision)
    torch.testing.assert_close(item.targets["perception"], torch.from_numpy(blocks["first_tv"]), rtol=0, atol=0)
    torch.testing.assert_close(item.targets["planning"], torch.from_numpy(blocks["penult_tv"]), rtol=0, atol=0)
    torch.testing.assert_close(item.targets["reasoning"], group_mean(torch.from_numpy(blocks["mid"]), 3))
    grouped = SampleJoiner(student=student, tiling=joiner.tiling, caches={"reasoning": cache}, k=5, grouped=True)
    torch.testing.assert_close(grouped(0, samples[0]).targets["reasoning"], torch.from_numpy(blocks["mid"]),
                               rtol=0, atol=0)

    with pytest.raises(DataError, match=rf"layout mismatch on sample {samples[1].key}: student digest \w+ .* digest "
                                        "0123456789abcdef"):
        joiner(1, samples[1])
    with pytest.raises(DataError, match=rf"sample {samples[2].key} .* missing from the perception cache.*--skip-missing"):
        joiner(2, samples[2])
    joiner.skip_missing = True
    skipped = joiner(2, samples[2])
    assert skipped.skipped.startswith("missing from the perception cache") and skipped.index == 2


def manifest(**changes):
    fields = dict(teacher={"family": "internvl", "name": "t"}, codec={}, dtype="fp32",
                  layout={"layout_version": LAYOUT_VERSION, "tiling": {"tile_size": 112, "max_tiles": 1}},
                  dataset={"dataset_digest": "abc"},
                  signals={"first_tv": SignalSpec([0], "perception"), "penult_tv": SignalSpec([4], "planning"),
                           "mid": SignalSpec([0, 1, 2, 3, 4], "reasoning")})
    fields.update(changes)
    return CacheManifest(**fields)


def test_check_cache_names_each_incompatibility():
    ok = dict(family="internvl", num_layers=4, k=3, dataset_digest="abc", skip_missing=False)
    assert check_cache(["reasoning"], FakeCache({"k": 1}, manifest()), **ok) == []
    grouped = manifest(student_layers=6, signals={"mid": SignalSpec([0, 1, 2, 3, 4], "reasoning",
                                                                     [[0, 1], [1, 2], [2, 3], [3, 4], [3, 4]])})
    problems = check_cache(["reasoning"], FakeCache({}, grouped), **{**ok, "dataset_digest": "other"})
    text = " ".join(problems)
    assert "pre-grouped for a student of 6 layers" in text and "this student has 4 layers" in text
    assert "no committed shard" in text and "another dataset" in text
    assert check_cache(["reasoning"], FakeCache({"k": 1}, grouped), **{**ok, "num_layers": 6, "k": 5}) == []
    bad = manifest(teacher={"family": "qwen2_5_vl", "name": "q"}, layout={"layout_version": 99, "tiling": {}},
                   signals={"mid": SignalSpec([0], "reasoning")})
    text = " ".join(check_cache(["planning"], FakeCache({"k": 1}, bad), **ok))
    assert "stores no 'penult_tv' signal" in text and "of family qwen2_5_vl" in text and "layout version 99" in text
    text = " ".join(check_cache(["perception", "reasoning"], FakeCache({"k": 1}, bad), **ok))
    assert "no 'first_tv' signal for the perception term" in text and "'mid'" not in text.split("stored")[0]
    assert check_cache(["planning"], FakeCache({"k": 1}, manifest(dataset={"dataset_digest": "x"})),
                       **{**ok, "skip_missing": True}) == []


def test_empty_or_missing_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        data_shards(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({
        "format": "drive-kd/qa-shards", "version": 1, "dataset_digest": "x", "num_samples": 0, "shards": [],
        "counts": {"perception": 0, "reasoning": 0, "planning": 0}, "skipped": [], "created": {}}))
    with pytest.raises(DataError, match="lists no samples"):
        data_shards(str(tmp_path))
