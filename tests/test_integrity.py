"""Cache integrity: checksums, commit-marker counts and index digest, verify, --repair, and the faults
of issue 12 made on real files on disk (a deleted, garbled or truncated chunk, a deleted index, an
undecodable image), plus the worker-side device choice."""

import io
import json
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

from cache_teacher.run import CacheConfig, run, worker_gpus
from cache_teacher.worker import CacheJobError, device_map_for
from pipeline.cache.format import CacheIntegrityError
from pipeline.cache.reader import open_cache
from train_student.train import main as train_main

VERIFY = [sys.executable, "-m", "cache_teacher.verify"]


def _config(tiny_models, data, out, **kw) -> CacheConfig:
    return CacheConfig(teacher=str(tiny_models["internvl", "teacher"]), data=str(data), out=str(out), workers=0,
                       **kw)


@pytest.fixture(scope="module")
def sound(tiny_models, tiny_shards, tmp_path_factory):
    """A committed cache of every signal over the 8-sample, 3-shard set (copied by each test)."""
    out = tmp_path_factory.mktemp("integrity") / "cache"
    run(_config(tiny_models, tiny_shards, out))
    return out


@pytest.fixture
def cache(sound, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(sound, copy)
    return copy


def _chunk(cache, shard=1, signal="first_tv"):
    return sorted((cache / "shards" / f"shard-{shard:06d}.zarr" / signal).glob("**/c/*"))[0]


def _key_in(cache, shard=1):
    return next(k for k, row in open_cache(cache).index.items() if row["shard"] == shard)


def _verify(cache, *extra):
    return subprocess.run(VERIFY + [str(cache), *extra], capture_output=True, text=True)


def _arrays(cache):
    opened = open_cache(cache)
    return {key: {s: opened[key].block(s) for s in opened.manifest.signals} for key in opened.keys()}


def test_committed_shards_carry_counts_digest_and_checksums(cache):
    marker = json.loads((cache / "shards" / "shard-000000.done").read_text())
    assert set(marker["arrays"]) >= {"first_tv/part-0000", "penult_tv/part-0000", "mid/part-0000"}
    assert all(count >= 1 for count in marker["arrays"].values()) and len(marker["index_sha256"]) == 64
    meta = json.loads((cache / "shards" / "shard-000000.zarr" / "first_tv" / "part-0000" / "zarr.json").read_text())
    assert "crc32c" in [codec["name"] for codec in meta["codecs"]]
    assert json.loads((cache / "cache.json").read_text())["version"] == 2
    result = _verify(cache, "--deep")
    assert result.returncode == 0 and "3 committed shard(s) sound" in result.stdout


def test_deleted_chunk_is_found_on_open_and_repaired(cache, tiny_models, tiny_shards):
    before = _arrays(cache)
    _chunk(cache).unlink()
    with pytest.raises(CacheIntegrityError, match=r"shard 1, signal first_tv: array first_tv/part-0000 holds 0 of"):
        open_cache(cache)
    result = _verify(cache)
    assert result.returncode == 1 and "shard 1, signal first_tv" in result.stdout and "[1]" in result.stderr
    with pytest.raises(ValueError, match=r"committed shard\(s\) \[1\] .* fail verification(.|\n)*--repair"):
        run(_config(tiny_models, tiny_shards, cache))
    run(_config(tiny_models, tiny_shards, cache, repair=True))
    after = _arrays(cache)
    assert sorted(after) == sorted(before)
    for key in before:
        for signal, block in before[key].items():
            np.testing.assert_array_equal(after[key][signal], block)


@pytest.mark.parametrize("damage", ["garble", "truncate"])
def test_damaged_chunk_names_cache_shard_signal_and_sample(cache, tiny_models, tiny_shards, damage):
    key = _key_in(cache)
    chunk = _chunk(cache)
    data = chunk.read_bytes()
    chunk.write_bytes(data[:20] + bytes(b ^ 0xFF for b in data[20:40]) + data[40:] if damage == "garble"
                      else data[: len(data) // 2])
    opened = open_cache(cache)  # counts and digest still hold: only reading finds it
    with pytest.raises(CacheIntegrityError) as err:
        opened[key].block("first_tv")
    message = str(err.value)
    assert all(part in message for part in (str(cache), "shard 1", "signal first_tv", f"sample {key}",
                                            "cache_teacher.verify", "--repair"))
    assert _verify(cache).returncode == 0  # the shallow check reads no chunk
    deep = _verify(cache, "--deep")
    assert deep.returncode == 1 and "shard 1, signal first_tv" in deep.stdout and "Traceback" not in deep.stderr
    run(_config(tiny_models, tiny_shards, cache, repair=True))
    assert _verify(cache, "--deep").returncode == 0 and open_cache(cache)[key].first_tv.ndim == 2


def test_deleted_index_is_named_and_repaired(cache, tiny_models, tiny_shards):
    (cache / "shards" / "shard-000002.parquet").unlink()
    with pytest.raises(CacheIntegrityError, match=r"shard 2: its index .*shard-000002.parquet is missing"):
        open_cache(cache)
    assert "shard 2" in _verify(cache).stdout
    cli = subprocess.run([sys.executable, "-m", "cache_teacher", "--teacher", str(tiny_models["internvl", "teacher"]),
                          "--data", str(tiny_shards), "--out", str(cache), "--workers", "0"],
                         capture_output=True, text=True)
    assert cli.returncode == 2 and "shard-000002.parquet is missing" in cli.stderr and "--repair" in cli.stderr
    assert "Traceback" not in cli.stderr
    run(_config(tiny_models, tiny_shards, cache, repair=True))
    assert len(open_cache(cache)) == 8


def test_version_1_cache_still_reads(cache):
    manifest = json.loads((cache / "cache.json").read_text())
    (cache / "cache.json").write_text(json.dumps({**manifest, "version": 1}))
    for marker in (cache / "shards").glob("*.done"):
        meta = json.loads(marker.read_text())
        marker.write_text(json.dumps({k: meta[k] for k in ("shard", "samples", "parts", "elements")}))
    assert len(open_cache(cache)) == 8 and _verify(cache, "--deep").returncode == 0


def test_trainer_names_a_damaged_chunk_without_a_traceback(cache, tiny_models, tiny_shards, tmp_path, capsys):
    chunk = _chunk(cache, shard=0)
    chunk.write_bytes(chunk.read_bytes()[:10])
    with pytest.raises(SystemExit) as exc:
        train_main(["--student", str(tiny_models["internvl", "student"]), "--data", str(tiny_shards),
                    "--cache", str(cache), "--out", str(tmp_path / "run"), "--set", "run.progress=false",
                    "--set", "data.num_workers=1", "--set", "data.shuffle_shards=false"])
    message = str(exc.value.code)
    assert all(part in message for part in ("shard 0", "signal first_tv", "sample ", "cache_teacher.verify"))
    assert "Traceback" not in message and not list((tmp_path / "run").glob("checkpoint-*"))


def test_undecodable_image_names_its_own_sample(tiny_models, tiny_shards, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_shards, data)
    shard = data / "shard-000001.tar"
    with tarfile.open(shard) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar if info.isfile()]
    keys = list(dict.fromkeys(info.name.partition(".")[0] for info, _ in members))
    bad = keys[1]
    with tarfile.open(shard, "w") as tar:
        for info, payload in members:
            if info.name.startswith(bad + ".") and not info.name.endswith(".json"):
                payload = b"not an image"
                info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(CacheJobError) as err:
        run(_config(tiny_models, data, tmp_path / "c", signals=["first_tv"]))
    message = str(err.value)
    assert f"sample {bad}" in message and f"sample {keys[0]}" not in message
    assert "does not decode" in message and ".." not in message.replace("...", "")


def test_device_and_dtype_are_resolved_from_what_the_worker_was_given(monkeypatch, tiny_models, tiny_shards):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a GPU-less head node drives Ray actors
    ray_job = CacheConfig(teacher="t", data="d", out="o", workers=2, gpus_per_worker=2)
    assert worker_gpus(ray_job) == 2 and worker_gpus(CacheConfig(teacher="t", data="d", out="o", workers=0)) == 0
    assert device_map_for(0) is None
    with pytest.raises(CacheJobError, match="given 1 GPU.* sees no CUDA device"):
        device_map_for(1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # inside the actor: the GPUs it was given
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device_map_for(2) == "auto" and device_map_for(1) == "cuda"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert device_map_for(1) == "cuda"
    assert worker_gpus(CacheConfig(teacher="t", data="d", out="o", workers=0, gpus_per_worker=1)) == 1
