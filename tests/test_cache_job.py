"""The teacher-cache job: contents, resume after SIGKILL, Ray, and bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr

from cache_teacher.run import CacheConfig, run
from cache_teacher.worker import CacheJobError
from pipeline.attention.capture import AttentionCapture, enable_capture
from pipeline.attention.layout import build_layout
from pipeline.attention.maps import dense_to_tril, group_mean, tv_block
from pipeline.cache.format import index_digest
from pipeline.cache.reader import open_cache
from pipeline.data.shards import iter_samples
from pipeline.models.load import load_model
from pipeline.models.processors import load_processor

CLI = [sys.executable, "-m", "cache_teacher"]


def _cache(tmp_path, tiny_models, tiny_shards, name="cache", **kw):
    config = CacheConfig(teacher=str(tiny_models["internvl", "teacher"]), data=str(tiny_shards),
                         out=str(tmp_path / name), workers=0, **kw)
    run(config)
    return open_cache(config.out)


def _reseal_index(cache_dir, shard, table):
    """Rewrite a shard's index and its marker's digest, as a cache of other content would hold."""
    index = cache_dir / "shards" / f"shard-{shard:06d}.parquet"
    pq.write_table(table, index)
    marker = cache_dir / "shards" / f"shard-{shard:06d}.done"
    meta = json.loads(marker.read_text())
    marker.write_text(json.dumps({**meta, "index_sha256": index_digest(index.read_bytes())}))


def _teacher_maps(model_dir, sample, layers):
    model = load_model(model_dir).eval()
    enable_capture(model)
    lay = build_layout(sample.record, sample.images, load_processor(model_dir))
    with torch.no_grad(), AttentionCapture(model, layers) as cap:
        model(**lay.model_inputs)
    return {k: v[0] for k, v in cap.maps.items()}, lay


def test_cache_holds_the_teacher_signals(tmp_path, tiny_models, tiny_shards):
    cache = _cache(tmp_path, tiny_models, tiny_shards)
    samples = list(iter_samples(tiny_shards))
    assert sorted(cache.keys()) == sorted(s.key for s in samples)
    m = cache.manifest
    assert m.teacher["num_layers"] == 6 and m.signals["first_tv"].layers == [0]
    assert m.signals["penult_tv"].layers == [4] and m.signals["mid"].layers == [0, 1, 2, 3, 4]
    assert m.signals["mid"].groups is None and m.student_layers is None
    sample = samples[-1]
    maps, lay = _teacher_maps(tiny_models["internvl", "teacher"], sample, [0, 1, 2, 3, 4])
    got = cache[sample.key]
    assert got.digest == lay.digest and got.capability == sample.record.capability
    assert got.layout["seq_len"] == lay.seq_len
    np.testing.assert_allclose(got.first_tv, tv_block(maps[0], lay.is_vision).numpy(), atol=1e-3, rtol=2e-3)
    np.testing.assert_allclose(got.penult_tv, tv_block(maps[4], lay.is_vision).numpy(), atol=1e-3, rtol=2e-3)
    assert got.mid_packed().shape == (5, lay.seq_len * (lay.seq_len + 1) // 2)
    np.testing.assert_allclose(got.mid(2), maps[2].numpy(), atol=1e-3, rtol=2e-3)


def test_pre_grouped_mid_for_a_student(tmp_path, tiny_models, tiny_shards):
    cache = _cache(tmp_path, tiny_models, tiny_shards, student=str(tiny_models["internvl", "student"]))
    spec = cache.manifest.signals["mid"]
    assert cache.manifest.student_layers == 4 and spec.groups == [[0, 1, 2], [1, 2, 3], [2, 3, 4]]
    assert cache.manifest.layout["image_backend"] == "pil"
    sample = next(iter_samples(tiny_shards))
    maps, _ = _teacher_maps(tiny_models["internvl", "teacher"], sample, [0, 1, 2, 3, 4])
    expected = dense_to_tril(group_mean(torch.stack([maps[i] for i in range(5)]), 3)).numpy()
    np.testing.assert_allclose(cache[sample.key].mid_packed(), expected, atol=1e-3, rtol=2e-3)


def test_lossy_codec_and_signal_subset(tmp_path, tiny_models, tiny_shards):
    lossless = _cache(tmp_path, tiny_models, tiny_shards, name="a", signals=["mid"])
    quant = _cache(tmp_path, tiny_models, tiny_shards, name="b", signals=["mid"], codec="quant")
    assert list(quant.manifest.signals) == ["mid"] and quant.manifest.codec["name"] == "quant"
    key = lossless.keys()[0]
    ref, approx = lossless[key].mid_packed(), quant[key].mid_packed()
    for r, a in zip(ref, approx):
        assert np.linalg.norm(r - a) / np.linalg.norm(r) < 0.01
    with pytest.raises(KeyError, match="stores no 'first_tv'"):
        _ = quant[key].first_tv


def test_readable_with_plain_zarr_and_pyarrow(tmp_path, tiny_models, tiny_shards):
    cache = _cache(tmp_path, tiny_models, tiny_shards)
    root = tmp_path / "cache"
    row = pq.read_table(root / "shards" / "shard-000000.parquet").to_pylist()[0]
    group = zarr.open_group(root / "shards" / "shard-000000.zarr", mode="r")
    flat = group["first_tv"][f"part-{row['first_tv_part']:04d}"]
    block = flat[row["first_tv_offset"]:row["first_tv_offset"] + row["first_tv_count"]]
    block = block.astype(np.float32).reshape(row["first_tv_shape"])
    np.testing.assert_array_equal(block, cache[row["key"]].first_tv)


def test_plot_returns_a_figure(tmp_path, tiny_models, tiny_shards):
    cache = _cache(tmp_path, tiny_models, tiny_shards)
    key = cache.keys()[0]
    fig = cache.plot(key, signal="penult_tv")
    assert len(fig.axes) == len(cache[key].layout["vision_spans"])
    fig.savefig(tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000


def _index_and_arrays(cache):
    rows = {k: {c: v for c, v in cache.index[k].items()} for k in cache.keys()}
    arrays = {k: {s: cache[k].block(s) for s in cache.manifest.signals} for k in cache.keys()}
    return rows, arrays


def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path, tiny_models, tiny_shards):
    reference = _cache(tmp_path, tiny_models, tiny_shards, name="reference")
    out = tmp_path / "killed"
    cmd = CLI + ["--teacher", str(tiny_models["internvl", "teacher"]), "--data", str(tiny_shards),
                 "--out", str(out), "--workers", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "shards" / "shard-000000.done").exists():
        assert proc.poll() is None and time.time() < deadline, "the job ended before committing a shard"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "shards" / "shard-000002.done").exists()
    subprocess.run(cmd, check=True, capture_output=True)
    resumed_rows, resumed_arrays = _index_and_arrays(open_cache(out))
    ref_rows, ref_arrays = _index_and_arrays(reference)
    assert resumed_rows == ref_rows
    for key, blocks in ref_arrays.items():
        for name, block in blocks.items():
            np.testing.assert_array_equal(resumed_arrays[key][name], block)


def test_ray_job_equals_in_process(tmp_path, tiny_models, tiny_shards):
    reference = _cache(tmp_path, tiny_models, tiny_shards, name="reference", signals=["first_tv"])
    config = CacheConfig(teacher=str(tiny_models["internvl", "teacher"]), data=str(tiny_shards),
                         out=str(tmp_path / "ray"), workers=2, gpus_per_worker=0, signals=["first_tv"])
    run(config)
    ray_rows, ray_arrays = _index_and_arrays(open_cache(config.out))
    ref_rows, ref_arrays = _index_and_arrays(reference)
    assert ray_rows == ref_rows
    for key in ref_arrays:
        np.testing.assert_array_equal(ray_arrays[key]["first_tv"], ref_arrays[key]["first_tv"])
    ray_module = __import__("ray")
    assert not ray_module.is_initialized()  # shut down after the job


def test_ray_worker_error_reaches_the_driver(tmp_path, tiny_models, tiny_shards):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_shards, data)
    (data / "shard-000002.tar").write_bytes((data / "shard-000002.tar").read_bytes()[:2500])
    config = CacheConfig(teacher=str(tiny_models["internvl", "teacher"]), data=str(data),
                         out=str(tmp_path / "ray"), workers=1, gpus_per_worker=0, signals=["first_tv"])
    with pytest.raises(CacheJobError, match="shard 2 .*shard-000002.tar"):
        run(config)
    assert (tmp_path / "ray" / "shards" / "shard-000000.done").exists()
    assert not (tmp_path / "ray" / "shards" / "shard-000002.done").exists()


def _error(args, tiny_models, tiny_shards, tmp_path):
    cmd = CLI + ["--teacher", str(tiny_models["internvl", "teacher"]), "--data", str(tiny_shards),
                 "--out", str(tmp_path / "c"), "--workers", "0"] + args
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    return result.stderr


def test_bad_input_errors(tmp_path, tiny_models, tiny_shards, monkeypatch):
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "models"))
    err = subprocess.run(CLI + ["--teacher", "InternVL3-38B", "--data", str(tiny_shards), "--out",
                                str(tmp_path / "c")], capture_output=True, text=True).stderr
    assert str(tmp_path / "models" / "InternVL3-38B") in err and "OpenGVLab/InternVL3-38B-hf" in err
    err = _error(["--student", str(tiny_models["qwen2_5_vl", "student"])], tiny_models, tiny_shards, tmp_path)
    assert "layout mismatch" in err and "family" in err
    err = _error(["--mid-end", "9"], tiny_models, tiny_shards, tmp_path)
    assert "end=9" in err and "6 layers" in err


def test_existing_cache_with_other_settings_is_refused(tmp_path, tiny_models, tiny_shards):
    _cache(tmp_path, tiny_models, tiny_shards, name="c", signals=["first_tv"])
    with pytest.raises(ValueError, match=r"different settings \(signals\.mid"):
        _cache(tmp_path, tiny_models, tiny_shards, name="c", signals=["first_tv", "mid"])
    cache = _cache(tmp_path, tiny_models, tiny_shards, name="c", signals=["first_tv", "mid"], overwrite=True)
    assert sorted(cache.manifest.signals) == ["first_tv", "mid"] and len(cache) == 8


def test_a_folder_without_committed_shards_takes_new_settings(tmp_path, tiny_models, tiny_shards, capsys):
    """A job that stopped before committing anything (e.g. --gpus-per-worker 1 on a machine without GPUs)
    leaves only cache.json; the corrected re-run replaces it instead of asking for --overwrite."""
    _cache(tmp_path, tiny_models, tiny_shards, name="c", signals=["first_tv"])
    for marker in (tmp_path / "c" / "shards").glob("*.done"):
        marker.unlink()
    cache = _cache(tmp_path, tiny_models, tiny_shards, name="c", signals=["first_tv", "mid"])
    assert sorted(cache.manifest.signals) == ["first_tv", "mid"] and len(cache) == 8
    assert "holds no committed shard; replacing its manifest" in capsys.readouterr().err


def test_truncated_data_shard_names_the_shard(tmp_path, tiny_models, tiny_shards):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_shards, data)
    shard = data / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(Exception, match="shard-000001.tar") as err:
        run(CacheConfig(teacher=str(tiny_models["internvl", "teacher"]), data=str(data),
                        out=str(tmp_path / "c"), workers=0))
    assert "re-run" in str(err.value)
    assert (tmp_path / "c" / "shards" / "shard-000000.done").exists()
    assert not (tmp_path / "c" / "shards" / "shard-000001.done").exists()


def test_disk_full_leaves_the_shard_uncommitted(tmp_path, tiny_models, tiny_shards, monkeypatch):
    from pipeline.cache.codecs import Float16Codec

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Float16Codec, "write", full)
    with pytest.raises(Exception, match="shard 0 .*No space left on device"):
        _cache(tmp_path, tiny_models, tiny_shards)
    assert not list((tmp_path / "cache" / "shards").glob("*.done"))


def test_unwritable_output(tmp_path, tiny_models, tiny_shards):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="cannot write the cache manifest"):
        run(CacheConfig(teacher=str(tiny_models["internvl", "teacher"]), data=str(tiny_shards),
                        out=str(blocker / "cache"), workers=0))


def test_fsspec_url_output(tiny_models, tiny_shards):
    config = CacheConfig(teacher=str(tiny_models["internvl", "teacher"]), data=str(tiny_shards),
                         out="memory://drive-kd-test/cache", workers=0, signals=["first_tv"])
    run(config)
    cache = open_cache(config.out)
    assert len(cache) == 8 and cache[cache.keys()[0]].first_tv.ndim == 2


def test_resume_refuses_a_changed_layout(tmp_path, tiny_models, tiny_shards):
    import pyarrow as pa

    _cache(tmp_path, tiny_models, tiny_shards, name="c", signals=["first_tv"])
    index = tmp_path / "c" / "shards" / "shard-000000.parquet"
    table = pq.read_table(index)
    digests = table.column("layout_digest").to_pylist()
    digests[0] = "0" * 16
    _reseal_index(tmp_path / "c", 0, table.set_column(table.schema.get_field_index("layout_digest"), "layout_digest",
                                                      pa.array(digests)))
    (tmp_path / "c" / "shards" / "shard-000002.done").unlink()
    with pytest.raises(ValueError, match="committed cache shards hold 0000000000000000"):
        _cache(tmp_path, tiny_models, tiny_shards, name="c", signals=["first_tv"])


def test_reader_refuses_an_index_without_its_columns(tmp_path, tiny_models, tiny_shards):
    _cache(tmp_path, tiny_models, tiny_shards, name="c", signals=["first_tv"])
    index = tmp_path / "c" / "shards" / "shard-000001.parquet"
    _reseal_index(tmp_path / "c", 1, pq.read_table(index).drop_columns(["first_tv_row_offset"]))
    with pytest.raises(ValueError, match=r"shard 1: index columns \['first_tv_row_offset'\] are missing"):
        open_cache(tmp_path / "c").keys()


def test_ray_start_up_failure_names_the_fix(tmp_path, tiny_models, tiny_shards, monkeypatch):
    import ray

    def refuse(*args, **kwargs):
        raise TimeoutError("Timed out waiting for the GCS to start\nmore lines")

    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(CacheJobError, match=r"could not start a local Ray instance: TimeoutError: Timed out .*--workers 0"):
        run(CacheConfig(teacher=str(tiny_models["internvl", "teacher"]), data=str(tiny_shards),
                        out=str(tmp_path / "c"), workers=1, gpus_per_worker=0))
