"""Codecs for cached attention: exactness, error bounds, edge cases, random access, sizes."""

import numpy as np
import pytest
import torch
import zarr

from pipeline.attention.maps import tril_to_dense
from pipeline.cache import codec_base, codecs
from pipeline.cache.codecs import (
    CODECS,
    codec_from_description,
    get_codec,
    measure,
    pack_tril,
    relative_frobenius,
    synthetic_causal_attention,
)

LOSSY = ["quant", "log8", "quant2"]


@pytest.fixture
def group(tmp_path):
    return zarr.open_group(tmp_path / "shard.zarr", mode="w", zarr_format=3)


@pytest.fixture(scope="module")
def causal_512():
    return synthetic_causal_attention(512, 2, seed=0)


def _round_trip(codec, group, values, row_lengths, block_rows=None):
    codec.write(group, "x", values, row_lengths=row_lengths, block_rows=block_rows)
    return codec.read(group, "x", start=0, stop=values.size, row_start=0, row_lengths=row_lengths)


def test_synthetic_map_is_a_causal_softmax(causal_512):
    attention, is_vision = causal_512
    assert attention.dtype == np.float32 and attention.shape == (512, 512)
    np.testing.assert_allclose(attention.sum(axis=1), 1.0, rtol=1e-5)
    assert (attention >= 0).all() and not np.triu(attention, k=1).any()
    assert is_vision.sum() > 0.5 * 512 and not is_vision[0]


def test_pack_unpack_tril_round_trip():
    full = np.tril(np.arange(16, dtype=np.float32).reshape(4, 4))
    packed = pack_tril(full)
    np.testing.assert_array_equal(packed, [0, 4, 5, 8, 9, 10, 12, 13, 14, 15])
    np.testing.assert_array_equal(tril_to_dense(torch.from_numpy(packed), 4).numpy(), full)


def test_relative_frobenius_hand_values():
    assert relative_frobenius(np.array([3.0, 4.0]), np.array([3.0, 0.0])) == pytest.approx(0.8)
    assert relative_frobenius(np.zeros(3), np.zeros(3)) == 0.0
    assert relative_frobenius(np.zeros(3), np.ones(3)) == float("inf")


def test_lossless_round_trip_is_exact_in_float16(group, causal_512):
    values = pack_tril(causal_512[0])
    codec = get_codec("lossless")
    decoded = _round_trip(codec, group, values, np.arange(1, 513))
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, values.astype(np.float16).astype(np.float32))
    assert codec.lossless and codec.describe()["lossless"] is True
    assert group["x"].dtype == np.float16


@pytest.mark.parametrize("name", LOSSY)
def test_lossy_error_below_one_percent_on_causal_map(name, causal_512):
    result = measure(get_codec(name), [causal_512[0]])
    assert result["rel_error"] < 0.01
    assert result["ratio_vs_raw_fp16_full"] > 4.0


def test_quant_error_below_one_percent_on_text_to_vision_block(causal_512):
    attention, is_vision = causal_512
    text_to_vision = attention[np.ix_(~is_vision, is_vision)]
    assert measure(get_codec("quant"), [text_to_vision], causal=False)["rel_error"] < 0.01


def test_log8_keeps_relative_precision_of_every_kept_entry(group, causal_512):
    # log8 has no Frobenius bound (~1% RMS on dense rows); its guarantee is per entry: kept entries
    # are within half a log step, exp(ln(1e4) / 254 / 2) - 1 = 1.83%, and the rest are <= floor.
    attention, is_vision = causal_512
    block = attention[np.ix_(~is_vision, is_vision)]
    rows = np.full(block.shape[0], block.shape[1])
    decoded = _round_trip(get_codec("log8"), group, block.ravel(), rows).reshape(block.shape)
    kept = decoded > 0
    assert np.abs(decoded[kept] / block[kept] - 1).max() <= np.expm1(np.log(1e4) / 254 / 2) + 1e-5
    assert (block <= 1e-4 * block.max(axis=1, keepdims=True))[~kept].all()


def test_quant_bounds_every_block_even_at_very_different_scales(group):
    rng = np.random.default_rng(1)
    blocks = [rng.random(300) * scale for scale in (1.0, 1e-4, 3e-7)] + [rng.random(300) ** 8]
    values = np.concatenate(blocks).astype(np.float32)
    codec = get_codec("quant", rel_error=0.004)
    decoded = _round_trip(codec, group, values, np.full(40, 30), block_rows=[10, 10, 10, 10])
    for b, block in enumerate(blocks):
        assert relative_frobenius(block, decoded[300 * b:300 * (b + 1)]) <= 0.004


def test_log8_hand_computed_row(group):
    values = np.array([1.0, 1e-2, 1e-5, 0.0], dtype=np.float32)  # floor 1e-4: 1e-5 -> 0
    decoded = _round_trip(get_codec("log8", rel_floor=1e-4), group, values, [4])
    np.testing.assert_allclose(decoded, [1.0, 1e-2, 0.0, 0.0], rtol=1e-5)
    np.testing.assert_array_equal(group["x/codes"][:], [255, 128, 0, 0])


@pytest.mark.parametrize("name", sorted(CODECS))
def test_zeros_stay_zero_and_all_zero_rows(name, group):
    rng = np.random.default_rng(2)
    rows = rng.random((6, 50)).astype(np.float32) / 50
    rows[rng.random(rows.shape) < 0.3] = 0.0
    rows[[1, 4]] = 0.0  # all-zero rows
    values = rows.ravel()
    decoded = _round_trip(get_codec(name), group, values, np.full(6, 50))
    assert np.isfinite(decoded).all()
    assert (decoded[values == 0] == 0).all()


@pytest.mark.parametrize("name", sorted(CODECS))
def test_all_zero_array(name, group):
    decoded = _round_trip(get_codec(name), group, np.zeros(20, np.float32), np.full(4, 5))
    np.testing.assert_array_equal(decoded, np.zeros(20, np.float32))


@pytest.mark.parametrize("name", sorted(CODECS))
def test_empty_array(name, group):
    decoded = _round_trip(get_codec(name), group, np.zeros(0, np.float32), np.zeros(0, np.int64))
    assert decoded.shape == (0,) and decoded.dtype == np.float32


@pytest.mark.parametrize("name", sorted(CODECS))
def test_single_element(name, group):
    decoded = _round_trip(get_codec(name), group, np.array([0.3], np.float32), np.array([1]))
    assert decoded.shape == (1,) and decoded[0] == pytest.approx(0.3, rel=0.01)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_random_access_of_a_middle_sample_across_chunks(name, group, monkeypatch):
    monkeypatch.setattr(codec_base, "CHUNK_BYTES", 512)  # many chunks, so reads cross chunk borders
    sizes = [40, 64, 52]
    maps = [synthetic_causal_attention(s, 1, seed=s, span_len=16, n_heads=2)[0] for s in sizes]
    row_lengths = np.concatenate([np.arange(1, s + 1) for s in sizes])
    values = np.concatenate([pack_tril(m) for m in maps])
    codec = get_codec(name)
    full = _round_trip(codec, group, values, row_lengths, block_rows=sizes)
    start, stop = sizes[0] * (sizes[0] + 1) // 2, sizes[0] * (sizes[0] + 1) // 2 + 64 * 65 // 2
    middle = codec.read(group, "x", start=start, stop=stop, row_start=sizes[0],
                        row_lengths=np.arange(1, 65))
    np.testing.assert_array_equal(middle, full[start:stop])
    assert relative_frobenius(maps[1], tril_to_dense(torch.from_numpy(middle), 64).numpy()) < 0.01


def test_unknown_codec_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="known codecs: log8, lossless, quant, quant2"):
        get_codec("zfp")
    with pytest.raises(ValueError, match="known codecs"):
        codec_from_description({"name": "zfp", "version": codecs.CODEC_FORMAT_VERSION})
    with pytest.raises(ValueError, match="version 99"):
        codec_from_description({"name": "quant", "version": 99, "params": {}})


def test_description_round_trip_and_bad_params():
    codec = get_codec("quant", rel_error=0.005)
    assert codec_from_description(codec.describe()) == codec
    with pytest.raises(ValueError, match="rel_error"):
        get_codec("quant", rel_error=2.0)
    with pytest.raises(ValueError, match="its parameters are"):
        get_codec("log8", bits=12)


def test_reading_with_another_codec_is_refused(group):
    get_codec("quant").write(group, "x", np.ones(4, np.float32), row_lengths=[4])
    with pytest.raises(ValueError, match="was written with codec"):
        get_codec("quant", rel_error=0.005).read(group, "x", start=0, stop=4, row_lengths=[4])


def test_bad_inputs_are_refused(group):
    quant = get_codec("quant")
    with pytest.raises(ValueError, match=">= 0"):
        quant.write(group, "a", np.array([0.5, -0.1], np.float32), row_lengths=[2])
    with pytest.raises(ValueError, match="pass row_lengths"):
        quant.write(group, "b", np.ones(3, np.float32))
    with pytest.raises(ValueError, match="sum to the number of values"):
        quant.write(group, "c", np.ones(3, np.float32), row_lengths=[1, 1])
    with pytest.raises(ValueError, match="NaN"):
        get_codec("lossless").write(group, "d", np.array([np.nan], np.float32))
    quant.write(group, "e", np.ones(6, np.float32), row_lengths=[3, 3])
    with pytest.raises(ValueError, match="outside the stored array"):
        quant.read(group, "e", start=3, stop=9, row_start=1, row_lengths=[3, 3])
    with pytest.raises(ValueError, match="row_lengths sum to"):
        quant.read(group, "e", start=0, stop=6, row_lengths=[3])
    with pytest.raises(ValueError, match="outside the 2 stored rows"):
        quant.read(group, "e", start=3, stop=6, row_start=2, row_lengths=[3])


def test_quant_is_ten_times_below_raw_float16_full_map_at_s1024():
    attention, _ = synthetic_causal_attention(1024, 3, seed=0)
    result = measure(get_codec("quant"), [attention])
    assert result["bytes_raw_fp16_full"] == 2 * 1024 * 1024
    assert result["rel_error"] < 0.01
    assert result["ratio_vs_raw_fp16_full"] >= 10.0


@pytest.mark.parametrize("name", sorted(CODECS))
def test_every_chunk_is_stored_and_checksummed(name, tmp_path, monkeypatch):
    monkeypatch.setattr(codec_base, "CHUNK_BYTES", 64)  # several chunks, one of them all zeros
    group = zarr.open_group(tmp_path / "shard.zarr", mode="w", zarr_format=3)
    values = np.zeros(400, np.float32)
    values[:100] = np.random.default_rng(0).random(100).astype(np.float32) / 10
    get_codec(name).write(group, "x", values, row_lengths=np.full(8, 50))
    arrays = [node for _, node in group.members(max_depth=None) if isinstance(node, zarr.Array)]
    assert all(a.nchunks_initialized == a.nchunks for a in arrays)  # zero chunks too: counts are exact
    chunk = sorted((tmp_path / "shard.zarr").glob("**/c/*"))[-1]
    data = chunk.read_bytes()
    chunk.write_bytes(data[:-6] + bytes(b ^ 0x5A for b in data[-6:]))
    with pytest.raises(ValueError, match="checksum"):
        get_codec(name).read(zarr.open_group(tmp_path / "shard.zarr", mode="r"), "x", start=0, stop=400,
                             row_start=0, row_lengths=np.full(8, 50))
