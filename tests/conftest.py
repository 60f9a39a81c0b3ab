"""Shared fixtures: tiny models of both families (built once per session) and QA records."""

from __future__ import annotations

import contextlib
import os
import threading
from http.server import ThreadingHTTPServer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
from PIL import Image, ImageDraw

from pipeline.data.demo import vocabulary_corpus
from pipeline.models.tiny import build_tiny
from schemas.qa import ImageRef, QARecord

NUSCENES_VIEWS = ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK_RIGHT", "CAM_BACK")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{(family, role): model_dir} for internvl and qwen2_5_vl, teacher and student."""
    root = tmp_path_factory.mktemp("models")
    return {(family, role): build_tiny(family, role, root / f"{family}-{role}", corpus=vocabulary_corpus())
            for family in ("internvl", "qwen2_5_vl") for role in ("teacher", "student")}


def make_sample(n_views: int = 1, *, key: str = "k0", capability: str = "perception",
                question: str = "What colour is the car ahead?\nA. Red\nB. Blue",
                answer: str = "A. Red <c1,CAM_FRONT,0.4678,0.6772>", size=(160, 120)):
    """A normalised record with ``n_views`` drawn images (placeholders first) and the PIL images."""
    views = NUSCENES_VIEWS if n_views == 6 else ("CAM_FRONT",) * n_views
    images = []
    for i, _view in enumerate(views):
        im = Image.new("RGB", size, (90, 90, 90))
        ImageDraw.Draw(im).rectangle([10 + 10 * i, 40, 60 + 10 * i, 90], fill=(220, 30, 30))
        images.append(im)
    refs = tuple(ImageRef(view=v, file=f"img{i}.png", source_path=f"x/{v}.png") for i, v in enumerate(views))
    record = QARecord(key=key, capability=capability, images=refs, question="<image>\n" * n_views + question,
                      answer=answer, source="test.json", index=0)
    return record, images


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """A generated driving QA set of 8 samples ingested into 3 WebDataset shards."""
    from pipeline.data.demo import generate
    from pipeline.data.ingest import ingest

    root = tmp_path_factory.mktemp("data")
    generate(root / "demo", samples=8, seed=3)
    ingest(root / "demo" / "qa.json", root / "demo", root / "shards", shard_size=3)
    return root / "shards"


@contextlib.contextmanager
def localhost_server(handler):
    """A ThreadingHTTPServer on 127.0.0.1 (port chosen by the OS) serving ``handler`` in a thread."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
