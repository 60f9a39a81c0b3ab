"""QA ingest and the shard reader: round trip, determinism, sharding, image paths, bad input."""

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import webdataset
from PIL import Image

from pipeline.data.ingest import candidate_paths, ingest
from pipeline.data.shards import ShardError, iter_samples, iter_shard, read_manifest, shard_paths
from schemas.qa import QARecord
from schemas.shards import dataset_digest

REPO = Path(__file__).resolve().parents[1]
CAMERAS = ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK_RIGHT", "CAM_BACK")


def save_image(path: Path, colour: tuple[int, int, int], fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), colour).save(path, format=fmt)


@pytest.fixture
def dataset(tmp_path):
    """A small QA set in the authors' format: 6-view nuScenes records with '.../' paths and BDD records."""
    root = tmp_path / "images"
    for i, cam in enumerate(CAMERAS):
        save_image(root / "nuscenes" / "samples" / cam / f"n008__{cam}__1.jpg", (40 * i, 10, 200), "JPEG")
    save_image(root / "bdd" / "val" / "a.png", (255, 0, 0), "PNG")
    save_image(root / "bdd" / "val" / "b.JPEG", (0, 255, 0), "JPEG")
    six = [f".../nuscenes/samples/{cam}/n008__{cam}__1.jpg" for cam in CAMERAS]
    records = [
        {"messages": [{"role": "user", "content": "<image>" * 6 + "\nWhat is ahead?"},
                      {"role": "assistant", "content": "A truck <c1,CAM_FRONT,0.4678,0.6772>."}],
         "images": six, "question_type": "perception"},
        {"messages": [{"role": "user", "content": "Will the truck turn?"},
                      {"role": "assistant", "content": "Probably left."}],
         "images": list(reversed(six)), "question_type": "reasoning"},
        {"question": "Should ego brake?", "answer": "Yes.", "images": ["bdd/val/a.png"], "type": "d"},
        {"question": "What colour?", "answer": "Green.", "images": [str(root / "bdd/val/b.JPEG")], "capability": "p"},
        {"question": "Lane?", "answer": "Keep lane.", "images": ["../bdd/val/a.png"], "question_type": "plan"},
    ]
    qa = tmp_path / "qa.json"
    qa.write_text(json.dumps(records))
    return qa, root, records


def tar_digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("shard-*.tar"))}


def test_round_trip_through_plain_webdataset(dataset, tmp_path):
    qa, root, records = dataset
    manifest = ingest(qa, root, tmp_path / "out")
    assert manifest.counts == {"perception": 2, "reasoning": 1, "planning": 2}
    samples = list(webdataset.WebDataset(shard_paths(tmp_path / "out"), shardshuffle=False))
    assert len(samples) == len(records) == manifest.num_samples
    assert manifest.dataset_digest == dataset_digest(s["__key__"] for s in samples)
    for index, sample in enumerate(samples):
        record = QARecord.from_json(json.loads(sample["json"]))
        assert record.key == sample["__key__"] and record.index == index
        assert len(record.key) == 16
        for ref, raw in zip(record.images, records[index]["images"]):
            assert ref.source_path == raw
            source = root / raw.removeprefix(".../").removeprefix("../")
            assert sample[ref.file] == source.read_bytes()
    first = QARecord.from_json(json.loads(samples[0]["json"]))
    assert first.answer == "A truck <c1,CAM_FRONT,0.4678,0.6772>."
    assert [ref.view for ref in first.images] == list(CAMERAS)
    assert [ref.file for ref in first.images] == [f"img{i}.jpg" for i in range(6)]
    second = QARecord.from_json(json.loads(samples[1]["json"]))
    assert second.question == "<image>\n" * 6 + "Will the truck turn?"
    assert QARecord.from_json(json.loads(samples[3]["json"])).images[0].file == "img0.jpg"  # .JPEG -> jpg


def test_shard_reader_decodes_samples(dataset, tmp_path):
    qa, root, _ = dataset
    ingest(qa, root, tmp_path / "out", shard_size=2)
    samples = list(iter_samples(str(tmp_path / "out")))
    assert [len(s.images) for s in samples] == [6, 6, 1, 1, 1]
    assert all(image.mode == "RGB" and image.size == (16, 12) for s in samples for image in s.images)
    assert samples[2].images[0].getpixel((0, 0)) == (255, 0, 0)
    assert samples[4].shard.endswith("shard-000002.tar")


def test_rerun_is_byte_identical_with_stable_keys(dataset, tmp_path):
    qa, root, _ = dataset
    first = ingest(qa, root, tmp_path / "a", shard_size=2)
    second = ingest(qa, root, tmp_path / "b", shard_size=2)
    again = ingest(qa, root, tmp_path / "a", shard_size=2)
    assert tar_digests(tmp_path / "a") == tar_digests(tmp_path / "b")
    assert first.dataset_digest == second.dataset_digest == again.dataset_digest
    assert [s.key for s in iter_samples(tmp_path / "a")] == [s.key for s in iter_samples(tmp_path / "b")]
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".ingest-")]


def test_sharding_and_stale_shards(dataset, tmp_path):
    qa, root, _ = dataset
    out = tmp_path / "out"
    manifest = ingest(qa, root, out, shard_size=2)
    assert [(e.name, e.samples) for e in manifest.shards] == [
        ("shard-000000.tar", 2), ("shard-000001.tar", 2), ("shard-000002.tar", 1)
    ]
    ingest(qa, root, out, shard_size=4)
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert read_manifest(out).num_samples == 5


def test_duplicate_content_gets_suffixes(tmp_path):
    save_image(tmp_path / "x.png", (1, 2, 3), "PNG")
    record = {"question": "q", "answer": "a", "images": ["x.png"], "type": "p"}
    qa = tmp_path / "qa.json"
    qa.write_text(json.dumps([record, record, record]))
    ingest(qa, tmp_path, tmp_path / "out")
    keys = [s.key for s in iter_samples(tmp_path / "out")]
    assert keys[1:] == [f"{keys[0]}-1", f"{keys[0]}-2"]


def test_candidate_paths(tmp_path):
    root = tmp_path / "nuscenes"
    found = root / "samples" / "CAM_FRONT" / "x.jpg"
    assert candidate_paths(".../samples/CAM_FRONT/x.jpg", root)[0] == found
    assert found in candidate_paths(".../nuscenes/samples/CAM_FRONT/x.jpg", root)
    assert found in candidate_paths("../../data/nuscenes/samples/CAM_FRONT/x.jpg", root)
    assert candidate_paths("/abs/x.jpg", root)[0] == Path("/abs/x.jpg")


def test_prefix_not_found_falls_back_to_shorter_paths(dataset, tmp_path):
    qa, root, _ = dataset
    manifest = ingest(qa, root / "nuscenes", tmp_path / "out", skip_bad=True)
    # '.../nuscenes/...' resolves under --image-root=nuscenes, 3 is absolute, 4 ('../bdd/...') is relative
    assert manifest.num_samples == 4
    assert [s.index for s in manifest.skipped] == [2]


def test_missing_images_list_every_record(dataset, tmp_path):
    qa, root, records = dataset
    qa.write_text(json.dumps(records + [dict(records[2], images=[f"gone/{i}.png"]) for i in range(12)]))
    out = tmp_path / "out"
    with pytest.raises(ValueError) as info:
        ingest(qa, root, out)
    message = str(info.value)
    assert "12 of 17 records in qa.json are unusable (first 10 shown):" in message
    assert "record 5, field 'images[0]': 'gone/0.png' not found" in message
    assert "record 14" in message and "record 15" not in message and "... and 2 more" in message
    assert "--image-root" in message and "--skip-bad" in message
    assert not list(out.iterdir())


def test_skip_bad_counts_in_manifest(dataset, tmp_path, capsys):
    qa, root, records = dataset
    (root / "bdd" / "val" / "a.png").write_bytes(b"not an image")
    malformed = {"question": "q", "images": ["bdd/val/b.JPEG"], "type": "p"}
    qa.write_text(json.dumps(records + [malformed]))
    with pytest.raises(ValueError, match="is not a readable image"):
        ingest(qa, root, tmp_path / "out")
    manifest = ingest(qa, root, tmp_path / "out", skip_bad=True)
    assert manifest.num_samples == 3
    assert [(s.index, s.field) for s in manifest.skipped] == [(2, "images[0]"), (4, "images[0]"), (5, "answer")]
    assert read_manifest(tmp_path / "out").skipped == manifest.skipped
    assert "skipped (--skip-bad): 3 of 6 records in qa.json are unusable" in capsys.readouterr().err


def test_unknown_type_needs_a_fallback(dataset, tmp_path):
    qa, root, records = dataset
    qa.write_text(json.dumps([dict(records[2], type="prediction")]))
    with pytest.raises(ValueError, match="unknown capability label 'prediction'"):
        ingest(qa, root, tmp_path / "out")
    assert ingest(qa, root, tmp_path / "out", on_unknown_type="reasoning").counts["reasoning"] == 1


def test_truncated_shard_names_the_shard(dataset, tmp_path):
    qa, root, _ = dataset
    ingest(qa, root, tmp_path / "out", shard_size=5)
    shard = shard_paths(tmp_path / "out")[0]
    with tarfile.open(shard) as tar:  # cut inside the data of the third member
        cut = tar.getmembers()[2].offset_data + 10
    Path(shard).write_bytes(Path(shard).read_bytes()[:cut])
    with pytest.raises(ShardError, match=f"shard {shard} is truncated or corrupt.*re-run"):
        list(iter_shard(shard))


def test_shard_cut_between_samples_fails_the_count(dataset, tmp_path):
    qa, root, _ = dataset
    ingest(qa, root, tmp_path / "out", shard_size=5)
    shard = Path(shard_paths(tmp_path / "out")[0])
    with tarfile.open(shard) as tar:  # keep the first sample's 7 members (6 images + json) only
        sizes = [512 + (info.size + 511) // 512 * 512 for info in tar.getmembers()[:7]]
    shard.write_bytes(shard.read_bytes()[: sum(sizes)])
    with pytest.raises(ShardError, match="holds 1 samples, its manifest says 5"):
        list(iter_samples(tmp_path / "out"))


def test_missing_member_names_shard_and_key(tmp_path):
    shard = tmp_path / "shard-000000.tar"
    record = QARecord.from_json({
        "version": 1, "key": "abc", "capability": "planning", "question": "<image>q", "answer": "a",
        "source": "qa.json", "index": 0, "images": [{"view": None, "file": "img0.png", "source_path": "x.png"}],
    })
    with webdataset.TarWriter(str(shard)) as writer:
        writer.write({"__key__": "abc", "json": json.dumps(record.to_json()).encode()})
    with pytest.raises(ShardError, match=f"shard {shard}, sample abc: .*'img0.png'"):
        list(iter_shard(str(shard)))


def test_missing_manifest_says_run_ingest(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `python -m pipeline.ingest"):
        read_manifest(tmp_path)


def test_cli(dataset, tmp_path):
    qa, root, _ = dataset
    out = tmp_path / "out"
    command = [sys.executable, "-m", "pipeline.ingest", "--qa", str(qa), "--out", str(out), "--shard-size", "3"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        command + ["--image-root", str(root)], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "wrote 5 samples" in done.stdout and "in 2 shards" in done.stdout
    assert json.loads((out / "manifest.json").read_text())["num_samples"] == 5
    bad = subprocess.run(
        command + ["--image-root", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 1 and "error: 4 of 5 records" in bad.stderr
