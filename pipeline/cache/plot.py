"""Text-to-vision attention drawn as heat maps over the camera views.

``view_heats`` turns a [n_text, n_vision] block into one square grid per image (averaging the
answer's query rows, or all text rows); ``draw_overlays`` draws one row of views per label (e.g.
teacher / Drive-KD student / baseline) over the camera images.
"""

from __future__ import annotations

import math
import textwrap

import numpy as np

from pipeline.data.shards import iter_shard, shard_paths


def text_rows(layout: dict, query: str) -> np.ndarray:
    """Row indices (into a tv block) of the query tokens: the answer's, or every text token."""
    if query not in ("answer", "all"):
        raise ValueError(f"query {query!r}: choose 'answer' or 'all'")
    vision = np.zeros(layout["seq_len"], dtype=bool)
    for start, end in layout["vision_spans"]:
        vision[start:end] = True
    text_positions = np.flatnonzero(~vision)
    if query == "all":
        return np.arange(len(text_positions))
    start, end = layout["answer_span"]
    return np.flatnonzero((text_positions >= start) & (text_positions < end))


def view_heats(tv_block: np.ndarray, layout: dict, *, query: str = "answer") -> list[np.ndarray]:
    """One [g, g] grid of attention mass per image (vision span), rows averaged over the query tokens."""
    weights = tv_block[text_rows(layout, query)].mean(axis=0)
    grids, offset = [], 0
    for start, end in layout["vision_spans"]:
        n = end - start
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"vision span of {n} tokens is not a square grid (multi-tile layout); "
                             "overlays are drawn for one-tile layouts only")
        grids.append(weights[offset:offset + n].reshape(side, side))
        offset += n
    return grids


def load_sample_images(data: str, key: str, shard: int):
    """(images, view names, record) of sample ``key`` from data shard ``shard``."""
    path = shard_paths(data)[shard]
    for sample in iter_shard(path):
        if sample.key == key:
            views = [ref.view or f"image {i}" for i, ref in enumerate(sample.record.images)]
            return sample.images, views, sample.record
    raise KeyError(f"sample {key} not found in data shard {path}; is {data} the dataset the cache was made from?")


def draw_overlays(images, views: list[str], rows: dict[str, list[np.ndarray]], *, title: str = ""):
    """A figure with one row per label and one column per camera view; heat maps over the images."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(rows), len(images)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(max(2.6 * n_cols, 4.2), 2.4 * n_rows + 0.9), squeeze=False)
    vmax = max(float(g.max()) for grids in rows.values() for g in grids) or 1.0
    for r, (label, grids) in enumerate(rows.items()):
        for c, (image, grid) in enumerate(zip(images, grids)):
            ax = axes[r][c]
            width, height = image.size
            ax.imshow(image)
            ax.imshow(grid, cmap="inferno", alpha=0.55, vmin=0, vmax=vmax, extent=(0, width, height, 0),
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(views[c], fontsize=8)
            if c == 0:
                ax.set_ylabel(label, fontsize=9)
    fig.suptitle(textwrap.fill(title, width=max(48, 16 * n_cols)), fontsize=8)
    fig.tight_layout()
    return fig


def plot_tv_overlay(sample, *, signal: str, data: str, query: str = "answer"):
    """Figure of one cached sample's text-to-vision attention over its camera views."""
    if signal not in ("first_tv", "penult_tv"):
        raise ValueError(f"signal {signal!r}: overlays are drawn for first_tv or penult_tv")
    images, views, record = load_sample_images(data, sample.key, sample.row["shard"])
    grids = view_heats(sample.block(signal), sample.layout, query=query)
    teacher = sample.cache.manifest.teacher["name"]
    title = f"{sample.key} ({record.capability}) - {signal}, {query} tokens\n{record.answer[:90]}"
    return draw_overlays(images, views, {f"{teacher} {signal}": grids}, title=title)
