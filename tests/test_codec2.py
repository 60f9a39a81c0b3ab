"""Codec quant2: the verified per-map bound (and its sink-aware variant), the entropy coder's round trip,
whole-block reads, device dequantisation, the writer's thread pool, and version-1 data still reading."""

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from cache_teacher.worker import prepare_blocks
from pipeline.attention.maps import group_mean
from pipeline.cache import codec_base, entropy
from pipeline.cache.codec2 import Quantised, search_steps
from pipeline.cache.codecs import (
    codec_from_description,
    get_codec,
    measure,
    pack_tril,
    relative_frobenius,
    synthetic_causal_attention,
)
from pipeline.cache.reader import DeviceTarget, open_cache
from pipeline.cache.writer import CacheShardWriter
from schemas.cache import CACHE_VERSION, CacheManifest, SignalSpec
from train_student.data import SampleJoiner


@pytest.fixture(scope="module")
def maps():
    return [synthetic_causal_attention(s, 1, seed=s, span_len=48, n_heads=3)[0] for s in (160, 96, 128)]


@pytest.fixture
def group(tmp_path):
    return zarr.open_group(tmp_path / "shard.zarr", mode="w", zarr_format=3)


def _triangles(maps):
    values = np.concatenate([pack_tril(m) for m in maps])
    lengths = np.concatenate([np.arange(1, m.shape[0] + 1) for m in maps])
    return values, lengths, [m.shape[0] for m in maps]


def _round_trip(codec, group, values, lengths, block_rows=None):
    codec.write(group, "x", values, row_lengths=lengths, block_rows=block_rows)
    return codec.read(group, "x", start=0, stop=values.size, row_start=0, row_lengths=lengths)


@pytest.mark.parametrize("rel_error", [0.0099, 0.003])
def test_every_map_meets_its_bound(group, maps, rel_error):
    values, lengths, rows = _triangles(maps)
    decoded = _round_trip(get_codec("quant2", rel_error=rel_error), group, values, lengths, rows)
    bounds = np.cumsum([0] + [r * (r + 1) // 2 for r in rows])
    for b in range(len(maps)):
        err = relative_frobenius(values[bounds[b]:bounds[b + 1]], decoded[bounds[b]:bounds[b + 1]])
        assert 0.5 * rel_error < err <= rel_error  # bounded, and not far below it (the step is searched)


def test_sink_aware_bound_holds_without_the_first_column(group, maps):
    values, lengths, rows = _triangles(maps)
    decoded = _round_trip(get_codec("quant2", sink=True), group, values, lengths, rows)
    first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    np.testing.assert_array_equal(decoded[first], values[first])  # the sink column is exact
    rest = np.ones(values.size, bool)
    rest[first] = False
    bounds = np.cumsum([0] + [r * (r + 1) // 2 for r in rows])
    for b in range(len(maps)):
        part = slice(bounds[b], bounds[b + 1])
        assert relative_frobenius(values[part][rest[part]], decoded[part][rest[part]]) <= 0.0099
        assert relative_frobenius(values[part], decoded[part]) <= 0.0099


def _error(row: torch.Tensor, step: float) -> float:
    step = torch.tensor(step, dtype=torch.float32)
    return float(torch.linalg.norm(row - torch.round(row / step) * step) / torch.linalg.norm(row))


def test_search_finds_a_near_optimal_feasible_step():
    rng = np.random.default_rng(0)
    x = torch.from_numpy((rng.random((3, 400)) ** np.array([[1.0], [4.0], [12.0]])).astype(np.float32))
    steps = search_steps(x, 0.01)
    for row, step in zip(x, steps.tolist()):
        assert _error(row, step) <= 0.01
        scan = [s for s in np.geomspace(step / 4, step * 4, 400) if _error(row, s) <= 0.01]
        assert step >= 0.9 * max(scan)  # naive scan: no much larger step meets the bound
    assert torch.equal(search_steps(torch.zeros(2, 5), 0.01), torch.ones(2))


@pytest.mark.parametrize("skip_first", [False, True])
def test_entropy_coder_round_trip_on_hard_codes(skip_first):
    rng = np.random.default_rng(1)
    lengths = np.array([0, 1, 5, 3, 0, 40, 40, 2], dtype=np.int64)
    codes = (rng.geometric(0.3, lengths.sum()) - 1).astype(np.int32)
    codes[::7] = rng.integers(0, 200_000, codes[::7].size)  # escapes and raw bits up to 2^18
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    if skip_first:
        codes[starts[lengths > 0]] = 0
    for triangle in (False, True):
        stream = entropy.encode_block(codes, starts, lengths, skip_first=skip_first, triangle=triangle)
        out = np.full(codes.size, -1, np.int32)
        entropy.decode_block(stream, starts, lengths, skip_first=skip_first, triangle=triangle, codes=out)
        expected = codes.copy()
        if skip_first:
            expected[starts[lengths > 0]] = -1  # skipped entries are not written
        np.testing.assert_array_equal(out, expected)
    with pytest.raises(ValueError, match="truncated"):
        entropy.decode_block(stream[: len(stream) // 2], starts, lengths, skip_first=skip_first, triangle=True,
                             codes=np.zeros(codes.size, np.int32))


def test_codes_of_a_sample_dequantise_on_the_device_as_on_the_host(group, maps):
    values, lengths, rows = _triangles(maps)
    codec = get_codec("quant2", rel_error=0.001, sink=True)  # small step: codes above 255 (uint16 carrier)
    codec.write(group, "x", values, row_lengths=lengths, block_rows=rows)
    start, stop = rows[0] * (rows[0] + 1) // 2, values.size
    blocks = codec.read_codes(group, "x", start=start, stop=stop, row_start=rows[0], row_lengths=lengths[rows[0]:])
    assert blocks.wide and blocks.codes.dtype == torch.int16 and blocks.codes.numel() == stop - start
    host = codec.read(group, "x", start=start, stop=stop, row_start=rows[0], row_lengths=lengths[rows[0]:])
    if torch.cuda.is_available():  # page-locked memory needs a CUDA build with a device
        blocks = blocks.pin_memory()
    np.testing.assert_array_equal(blocks.dequantise("cpu").numpy(), host)
    assert relative_frobenius(values[start:stop], host) <= 0.001
    with pytest.raises(ValueError, match="not whole stored blocks"):
        codec.read(group, "x", start=0, stop=10, row_start=0, row_lengths=[1, 2, 3, 4])


def test_version_1_descriptions_and_arrays_still_read(group):
    v1 = {"name": "quant", "version": 1, "lossless": False, "params": {"rel_error": 0.0095, "clevel": 5}}
    codec = codec_from_description(v1)
    codec.write(group, "x", np.linspace(0, 1, 12, dtype=np.float32), row_lengths=[6, 6])
    group["x"].attrs["codec"] = v1  # as a version-1 writer left it
    decoded = codec.read(zarr.open_group(group.store, mode="r"), "x", start=0, stop=12, row_lengths=[6, 6])
    assert relative_frobenius(np.linspace(0, 1, 12), decoded) <= 0.0095
    assert codec.describe()["version"] == 1 and get_codec("quant2").describe()["version"] == 2
    assert codec_base.CODEC_FORMAT_VERSION == 2
    with pytest.raises(ValueError, match="does not exist in codec format version 1"):
        codec_from_description({**v1, "name": "quant2", "params": {}})
    assert codec_from_description(get_codec("quant2", sink=True).describe()) == get_codec("quant2", sink=True)
    with pytest.raises(ValueError, match="sink must be"):
        get_codec("quant2", sink=1)


def test_quant2_is_smaller_than_quant_on_causal_maps():
    attention = synthetic_causal_attention(512, 2, seed=0)[0]
    quant, quant2 = measure(get_codec("quant"), [attention]), measure(get_codec("quant2"), [attention])
    assert quant2["rel_error"] <= 0.0099 and quant2["ratio_vs_raw_fp16_triangle"] >= 1.15 * quant["ratio_vs_raw_fp16_triangle"]


def test_writer_thread_pool_device_codes_and_trainer_targets(tmp_path, maps, monkeypatch):
    monkeypatch.setattr(codec_base, "CHUNK_BYTES", 4096)  # blobs span several checksummed chunks
    codec = get_codec("quant2")
    root = str(tmp_path / "cache")
    manifest = CacheManifest(teacher={"name": "t", "family": "internvl"}, codec=codec.describe(), dtype="float32",
                             signals={"first_tv": SignalSpec(layers=[0], role="perception"),
                                      "mid": SignalSpec(layers=[0, 1], role="reasoning")},
                             layout={"layout_version": 1}, dataset={})
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "cache.json").write_text(manifest.dumps())
    samples = {}
    with CacheShardWriter(root=root, index=0, codec=codec, signals=["first_tv", "mid"], threads=2,
                          flush_bytes=40_000) as writer:
        for i, attention in enumerate(maps):
            size = attention.shape[0]
            mid = np.stack([pack_tril(attention), pack_tril(attention ** 2 / (attention ** 2).sum(1, keepdims=True))])
            tv = np.ascontiguousarray(attention[size // 2:, : size // 3])
            blocks = {"first_tv": tv, "mid": mid}
            if i == 1:  # the worker's path: quantised first (on its device), codes handed over
                blocks = prepare_blocks(codec, {name: torch.from_numpy(b) for name, b in blocks.items()})
                assert all(isinstance(q, Quantised) and q.codes.dtype in (np.uint8, np.uint16) for q in blocks.values())
            writer.add({"key": f"s{i}", "shard": 0, "capability": "perception", "seq_len": size, "n_text": 0,
                        "n_vision": 0, "layout_digest": "d", "layout": "{}"}, blocks)
            samples[f"s{i}"] = (tv, mid)
        writer.commit()
    assert CACHE_VERSION == 2
    opened = []
    open_part = type(codec).open_part
    monkeypatch.setattr(type(codec), "open_part", lambda self, group, name: opened.append(name) or open_part(self, group, name))
    cache = open_cache(root)
    for key, (tv, mid) in samples.items():
        sample = cache[key]
        assert relative_frobenius(tv, sample.first_tv) <= 0.0099
        for m in range(2):
            assert relative_frobenius(mid[m], sample.mid_packed()[m]) <= 0.0099
        target = sample.target("mid", group=1)
        assert isinstance(target, DeviceTarget)
        dense = target.to("cpu", non_blocking=True)
        torch.testing.assert_close(dense, group_mean(torch.from_numpy(sample.mid_packed()), 1), rtol=0, atol=0)
        np.testing.assert_array_equal(sample.target("first_tv").to("cpu").numpy(), sample.first_tv)
    assert len(opened) == len(cache._parts) < 2 * len(samples)  # each stored part's offsets read once
    joiner = SampleJoiner(student="unused", tiling=None, caches={}, k=1, grouped=False)
    reasoning = joiner._target(cache["s0"], "reasoning")  # the trainer's targets: codes, dequantised on .to()
    torch.testing.assert_close(reasoning.to("cpu"), group_mean(torch.from_numpy(cache["s0"].mid_packed()), 1))
    np.testing.assert_array_equal(joiner._target(cache["s0"], "perception").to("cpu").numpy(), cache["s0"].first_tv)
    assert isinstance(prepare_blocks(get_codec("quant"), {"mid": torch.ones(2, 3)})["mid"], np.ndarray)


def test_cache_job_with_quant2_matches_a_lossless_cache(tmp_path, tiny_models, tiny_shards):
    from cache_teacher.run import CacheConfig, run

    caches = {}
    for codec, params in (("lossless", {}), ("quant2", {}), ("quant2-zstd", {"entropy": "zstd"})):
        config = CacheConfig(teacher=str(tiny_models["internvl", "teacher"]), data=str(tiny_shards),
                             out=str(tmp_path / codec), workers=0, codec=codec.split("-")[0], codec_params=params)
        run(config)
        caches[codec] = open_cache(config.out)
    assert caches["quant2"].manifest.codec == get_codec("quant2").describe() and len(caches["quant2"]) == 8
    for key in caches["lossless"].keys():
        for signal in ("first_tv", "penult_tv", "mid"):
            ref, got = caches["lossless"][key].block(signal), caches["quant2"][key].block(signal)
            np.testing.assert_array_equal(caches["quant2-zstd"][key].block(signal), got)  # same codes
            maps = ref.reshape(-1, ref.shape[-1]) if signal == "mid" else ref[None]
            for r, g in zip(maps, got.reshape(maps.shape)):
                assert relative_frobenius(r, g) < 0.0105  # 0.99% against the float16 reference


# ---------------------------------------------------------------------------- the zstd entropy stage
@pytest.mark.parametrize("params", [{}, {"sink": True}, {"rel_error": 0.0001}])
def test_zstd_stage_round_trips_triangles_and_rectangles_like_the_context_stage(params):

    from pipeline.cache.codec2 import RECT_COLUMNS, TRIANGLE_COLUMNS

    rng = np.random.default_rng(3)
    size = 40
    attention = np.tril(rng.random((size, size)) ** 6)
    attention /= attention.sum(1, keepdims=True)
    attention[:, 0] += 5.0  # a sink: codes above 255 (escapes)
    tri = attention[np.tril_indices(size)].astype(np.float32)
    rect = rng.random((6, 11)).astype(np.float32)
    for values, lengths, kind in ((np.concatenate([tri, tri * 2]), np.tile(np.arange(1, size + 1), 2), TRIANGLE_COLUMNS),
                                  (rect.ravel(), np.full(6, 11), RECT_COLUMNS)):
        rows = [size, size] if kind == TRIANGLE_COLUMNS else [6]
        np.testing.assert_array_equal(_stored_codes("zstd", values, lengths, rows, kind, params),
                                      _stored_codes("context", values, lengths, rows, kind, params))


def _stored_codes(stage: str, values, lengths, rows, kind, params) -> np.ndarray:
    """The codes quant2 with entropy `stage` writes and reads back (a fast stage hands the device uint8
    bytes in `kind`'s column layout); two stages of the same parameters must give the same codes."""
    group = zarr.open_group(zarr.storage.MemoryStore({}), mode="w", zarr_format=3)
    codec = get_codec("quant2", entropy=stage, **params)
    codec.write(group, "x", values, row_lengths=lengths, block_rows=rows)
    blocks = codec.read_codes(group, "x", start=0, stop=values.size, row_lengths=lengths)
    if stage != "context":
        assert [k for k, _, _ in blocks.layouts] == [kind] * len(rows) and blocks.codes.dtype == torch.uint8
    return blocks.numpy()


def test_zstd_stage_refuses_a_frame_of_the_wrong_size_and_bad_parameters():
    import numcodecs

    from pipeline.cache.codec2 import _zstd_decode, frame_content_size

    for n in (0, 1, 255, 256, 65791, 65792, 300000):
        assert frame_content_size(numcodecs.Zstd(3).encode(np.zeros(n, np.uint8))) == n
    frame = numcodecs.Zstd(3).encode(np.zeros(10, np.uint8))
    stream = len(frame).to_bytes(4, "little") + frame
    with pytest.raises(ValueError, match="holds 10 codes, the block has 12"):
        _zstd_decode(stream, 0, 12, np.zeros(12, np.uint8))
    with pytest.raises(ValueError, match="entropy must be one of context, zstd"):
        get_codec("quant2", entropy="lz4")
    with pytest.raises(ValueError, match="zstd_level must be an integer in"):
        get_codec("quant2", entropy="zstd", zstd_level=0)


def test_cache_cli_passes_codec_parameters_and_refuses_bad_ones():
    from cache_teacher.cli import parse_args

    base = ["--teacher", "t", "--data", "d", "--out", "o", "--codec", "quant2"]
    config = parse_args([*base, "--codec-param", "entropy=zstd", "--codec-param", "sink=true"])
    assert config.codec_params == {"entropy": "zstd", "sink": True}
    config = parse_args([*base, "--codec-param", "tv_rel_error=0.035"])
    assert config.codec_params == {"tv_rel_error": 0.035}
    config.validate()
    with pytest.raises(ValueError, match="entropy must be one of"):
        parse_args([*base, "--codec-param", "entropy=x"]).validate()


def test_a_read_mixing_both_entropy_stages_is_refused():
    from pipeline.cache.codec2 import decode_blobs

    values = np.random.default_rng(1).random(10).astype(np.float32)
    blobs = []
    for stage in ("context", "zstd"):
        codec = get_codec("quant2", entropy=stage)
        blobs.append(codec.encode(codec.quantise(torch.from_numpy(values), [10], [1]), 0))
    offsets = np.array([0, len(blobs[0]), len(blobs[0]) + len(blobs[1])])
    with pytest.raises(ValueError, match="both entropy stages"):
        decode_blobs(b"".join(blobs), offsets, np.array([10, 10]), np.array([0, 1, 2]))


# ---------------------------------------------------------------------------- the rans entropy stage
def _rans_round_trip(codes, lengths, has_left, coder="rans"):
    from pipeline.cache import rans, tans

    coder = {"rans": rans, "tans": tans}[coder]
    stream = coder.encode(codes, np.asarray(lengths), has_left=has_left)
    out = np.zeros(codes.size, np.uint8)
    escapes = coder.decode(stream, np.asarray(lengths), has_left=has_left, out=out)
    decoded = out.astype(np.int64)
    decoded[out == 255] = escapes
    return decoded, stream


@pytest.mark.parametrize("coder", ["rans", "tans"])
@pytest.mark.parametrize("case", ["sparse", "dense", "wide", "zero", "one-entry", "single", "rect", "rows",
                                  "empty", "matches"])
def test_rans_coder_is_lossless(case, coder):
    rng = np.random.default_rng(11)
    size = 70
    lengths, has_left = np.arange(size, 0, -1), True  # a triangle's columns
    n = int(lengths.sum())
    if case == "sparse":  # runs, MATCHes (rows persisting across columns) and codes up to 300
        codes = np.where(rng.random(n) < 0.1, rng.integers(1, 300, n), 0)
    elif case == "dense":
        codes = rng.integers(0, 20, n)
    elif case == "wide":  # codes above 255 and 65535 (escapes, long raw bits)
        codes = np.where(rng.random(n) < 0.3, rng.integers(1, 1 << 20, n), 0)
    elif case == "zero":
        codes = np.zeros(n, np.int64)
    elif case == "one-entry":  # columns of one code each
        lengths = np.ones(50, np.int64)
        codes = rng.integers(0, 3, 50)
    elif case == "single":  # a one-row triangle
        lengths, codes = np.array([1]), np.array([7])
    elif case == "rect":  # bottom-aligned equal columns, long zero runs
        lengths = np.full(9, 200)
        codes = np.zeros(1800, np.int64)
        codes[rng.integers(0, 1800, 40)] = rng.integers(1, 1000, 40)
    elif case == "rows":  # one column in row order, no left neighbour
        lengths, has_left = np.array([5000]), False
        codes = np.where(rng.random(5000) < 0.02, rng.integers(1, 40, 5000), 0)
    elif case == "empty":  # a block without entries, and one of empty columns
        lengths, codes = (np.zeros(0, np.int64), np.zeros(0, np.int64)) if coder == "rans" else (
            np.zeros(3, np.int64), np.zeros(0, np.int64))
    else:  # rows persisting across columns (MATCH symbols), runs up to the whole column, big codes
        rows = rng.random(size) < 0.2
        codes = np.concatenate([np.where(rows[size - n:], rng.integers(1, 600, n), 0) for n in lengths])
    for dtype in (np.uint8, np.uint16, np.int32):
        if codes.max(initial=0) <= np.iinfo(dtype).max:
            decoded, _ = _rans_round_trip(codes.astype(dtype), lengths, has_left, coder)
            np.testing.assert_array_equal(decoded, codes)


@pytest.mark.parametrize("coder", ["rans", "tans"])
def test_rans_coder_refuses_damaged_streams(coder):
    from pipeline.cache import rans, tans

    module = {"rans": rans, "tans": tans}[coder]
    rng = np.random.default_rng(5)
    lengths = np.arange(40, 0, -1)
    codes = np.where(rng.random(820) < 0.2, rng.integers(1, 30, 820), 0).astype(np.uint8)
    _, stream = _rans_round_trip(codes, lengths, True, coder)
    for bad in (stream[:-3], stream[:10], stream[:16] + bytes(len(stream) - 16)):
        with pytest.raises(ValueError, match=f"{coder} stream"):
            module.decode(bad, lengths, has_left=True, out=np.zeros(820, np.uint8))
    if coder == "tans":  # a flipped bit anywhere (tables, bit stream, final state): a clear error, or at worst
        refused = 0    # other codes (the storage's crc32c chunks catch those); never a crash
        flips = [stream[:i] + bytes([stream[i] ^ 0x10]) + stream[i + 1:] for i in range(0, len(stream), 3)]
        for damaged in flips:
            try:
                module.decode(damaged, lengths, has_left=True, out=np.zeros(820, np.uint8))
            except ValueError as exc:
                assert "tans stream" in str(exc)
                refused += 1
        assert refused >= 0.8 * len(flips)


@pytest.mark.parametrize("stage", ["rans", "tans"])
@pytest.mark.parametrize("params", [{}, {"sink": True}, {"rel_error": 0.0001}])
def test_rans_stage_reads_the_context_stages_codes(maps, params, stage):
    from pipeline.cache.codec2 import RECT_COLUMNS, TRIANGLE_COLUMNS

    values, lengths, rows = _triangles(maps)
    values = values.copy()
    values[np.cumsum(np.concatenate([[0], lengths[:-1]]))] += 5.0  # a sink: codes above 255 (escapes)
    rect = np.random.default_rng(2).random((6, 11)).astype(np.float32) ** 8
    for vals, lens, blocks, kind in ((values, lengths, rows, TRIANGLE_COLUMNS),
                                     (rect.ravel(), np.full(6, 11), [6], RECT_COLUMNS)):
        np.testing.assert_array_equal(_stored_codes(stage, vals, lens, blocks, kind, params),
                                      _stored_codes("context", vals, lens, blocks, kind, params))


def test_tans_stage_reads_as_the_zstd_stage_on_random_and_structured_codes():
    """The same codes through the tans and zstd stages: random dense values, a structured map with
    persisting rows, escapes (codes above 255 and 65535), an all-zero map, and one rectangle block."""
    rng = np.random.default_rng(7)
    size = 64
    tri = np.tril(rng.random((size, size)) ** 3)
    tri[:, 0] += 3.0
    structured = np.tril(np.outer(rng.random(size) < 0.3, rng.random(size)) + np.eye(size))
    for dense in (tri, structured, np.zeros((size, size))):
        values = dense[np.tril_indices(size)].astype(np.float32)
        lengths = np.arange(1, size + 1)
        for params in ({}, {"rel_error": 0.0001}):
            np.testing.assert_array_equal(_stored_codes("tans", values, lengths, [size], 1, params),
                                          _stored_codes("zstd", values, lengths, [size], 1, params))
    rect = (rng.random((7, 30)) ** 6).astype(np.float32).ravel()
    np.testing.assert_array_equal(_stored_codes("tans", rect, np.full(7, 30), [7], 2, {}),
                                  _stored_codes("zstd", rect, np.full(7, 30), [7], 2, {}))


def test_a_damaged_tans_blob_raises_a_clear_error():
    values = np.random.default_rng(2).random(55).astype(np.float32)
    lengths = np.arange(1, 11)
    group = zarr.open_group(zarr.storage.MemoryStore({}), mode="w", zarr_format=3)
    codec = get_codec("quant2", entropy="tans")
    blob = codec.encode(codec.quantise(torch.from_numpy(values), lengths, [10]), 0)
    from pipeline.cache.codec2 import decode_blobs

    with pytest.raises(ValueError, match="tans stream of .* damaged or truncated"):
        decode_blobs(blob[:-2], np.array([0, len(blob) - 2]), lengths, np.array([0, 10]))
    codec.write(group, "x", values, row_lengths=lengths, block_rows=[10])
    assert codec_from_description(codec.describe()) == codec


def test_tans_streams_of_format_1_still_decode():
    """Streams written by the tans stage's format 1 (code levels 1..7 in the joint symbol, the left
    code's level as context; a committed fixture) decode to their codes: caches written before format 2
    stay readable."""
    from pipeline.cache import tans

    fixture = np.load(Path(__file__).parent / "fixtures" / "tans_v1_streams.npz")
    for kind in ("tri", "rect"):
        codes, lengths = fixture[f"{kind}_codes"].astype(np.int64), fixture[f"{kind}_lengths"]
        stream = fixture[f"{kind}_stream"].tobytes()
        assert not tans._HEAD.unpack_from(stream)[4] & tans._V2  # really format 1
        out = np.zeros(codes.size, np.uint8)
        escapes = tans.decode(stream, lengths, has_left=True, out=out)
        decoded = out.astype(np.int64)
        decoded[out == tans.ESCAPE] = escapes
        np.testing.assert_array_equal(decoded, codes)
        # the current encoder writes format 2, which decodes to the same codes
        again, stream2 = _rans_round_trip(codes, lengths, True, "tans")
        assert tans._HEAD.unpack_from(stream2)[4] & tans._V2
        np.testing.assert_array_equal(again, codes)


def test_text_to_vision_signals_take_their_own_bound(group, maps):
    """tv_rel_error bounds every signal but ``mid`` (which keeps rel_error); the description of a codec
    without it is the one written before it existed, so existing caches still read."""
    codec = get_codec("quant2", entropy="tans", tv_rel_error=0.03)
    tv = np.ascontiguousarray(maps[0][100:160, 8:56])  # a text-to-vision-like rectangle [n_text, n_vision]
    mid = np.stack([pack_tril(maps[0]), pack_tril(np.sqrt(maps[0]))])  # two maps of one size
    for signal, block, bound in (("first_tv", tv, 0.03), ("penult_tv", tv, 0.03), ("mid", mid, 0.0099)):
        q = codec.quantise_signal(signal, torch.from_numpy(block))  # the cache writer's path
        codec.write_blobs(group, signal, [codec.encode(q, b) for b in range(q.block_rows.size)], q.row_lengths,
                          q.block_rows)
        decoded = codec.read(group, signal, start=0, stop=q.size, row_lengths=q.row_lengths)
        for got, want in zip(np.split(decoded, q.block_rows.size), block.reshape(q.block_rows.size, -1)):
            assert 0.5 * bound < relative_frobenius(want, got) <= bound, signal
    assert codec.bound("mid") == 0.0099 and codec.bound("first_tv") == 0.03
    assert "tv_rel_error" not in get_codec("quant2").describe()["params"]
    assert codec_from_description(get_codec("quant2").describe()) == get_codec("quant2")
    assert codec_from_description(codec.describe()) == codec
    with pytest.raises(ValueError, match="tv_rel_error must be"):
        get_codec("quant2", tv_rel_error=0.9)
