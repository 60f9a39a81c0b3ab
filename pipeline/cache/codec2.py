"""Codec ``quant2`` (codec format version 2): bounded per-map uniform quantisation, then an entropy stage
per map (one variable-length blob each): a 2-D context model (``entropy="context"``, the smallest),
zstd over the map's codes in column order (``entropy="zstd"``, ~20x less host time to decode), a
static context model with rANS over the same column order (``entropy="rans"``, near the context
stage's size at a fraction of its decode time), or the same column order with joint (zero run, code)
symbols and table ANS (``entropy="tans"``, ~6% larger than ``rans``, under half its host decode time).

Quantisation (``quantise``, torch, on whatever device holds the maps): one step per block (map),
searched with a few batched reductions (no host sync until the codes are ready) and verified: the
reconstruction ``codes * step`` in float32, exactly as decoded, has relative Frobenius error
<= ``rel_error`` (norms in float32). ``sink=True`` stores entry 0 of every row exactly (float32; in a
packed triangle that is key 0, the attention sink) and bounds the error of the REST of the map, whose
small entries a whole-map bound would mostly zero. ``tv_rel_error`` gives the text-to-vision signals
(every signal but ``mid``) a bound of their own: their diffuse blocks take 4.4x at 1% per block on real
maps, 7.2x at 3%, 9.6x at 5% (tans stage; README "Storage"). Codes cross to the host as uint8 or uint16
(1-2 bytes per entry; int32 only if a code exceeds 65535).

Entropy stages:
- ``context`` (``pipeline.cache.entropy``): an adaptive binary arithmetic coder whose contexts come from
  the rows above (a running column mean, the code above, the code to the left, the distance to the
  diagonal), numba-compiled and GIL-free, so the writer encodes maps in a thread pool. Sequential:
  decoding costs about as much as encoding.
- ``zstd`` (``zstd_level``): the map's codes in COLUMN order (a key's salience persists down the rows,
  so a column is long runs of similar codes; in a packed triangle column j holds rows j..S-1; the
  worker reorders them on the teacher's device), one byte per code with ``ESCAPE`` (255) standing for
  codes >= 255, one zstd frame; the escaped codes' values in a second frame. The host only runs zstd:
  the reader hands the column-ordered bytes to the device, which puts the escapes back, restores row
  order and dequantises (``CodeBlocks.layouts``, ``CodeBlocks.escapes``).
- ``rans`` (``pipeline.cache.rans``): the same column order, each column as zero runs (most often "as
  many zeros as the column to the left has here") and non-zero codes, context-modelled with static
  per-map frequency tables and rANS: near the context stage's size, decoding costs per non-zero code
  instead of per entry, and yields the zstd stage's form (bytes with escapes) for the device to finish.
- ``tans`` (``pipeline.cache.tans``): the rans stage's column order, but a zero run and the code after
  it are one symbol (codes >= 16 add a second), in the context of the code to the left (zero or not)
  and the code above, coded with table ANS (zstd's FSE construction, one state shared by every
  context's table): decoding is one table lookup and one bit-stream read per non-zero code; the same
  output form as ``zstd`` and ``rans``.

Blob of one map: header ``<f B I`` (step float32, flags: 1 = sink, 2 = triangle, 4 = zstd stage,
8 / 16 = escaped codes as uint16 / uint32, 32 = column order, 64 = rans stage, 128 = tans stage; byte length of the exact first column, blosc-zstd
float32, 0 without sink), that column, then the coded stream.
Layout: group ``name`` (attrs {"codec": describe()}) holding ``blob`` (uint8, crc32c chunks, no further
compression), ``blob_offset``, ``block_row`` and ``block_elem`` (int64 [n_blocks + 1]: byte, row and
element offset of each block). A read covers whole blocks (a sample's maps).

Measured on real maps (SmolLM2-135M-Instruct, all 30 layers, S = 1736, three texts; README "Storage",
``benchmarks/results/cache_real-maps_smollm2.json``): 22.1x against the raw float16 lower triangle at
<= 0.99% per map (quant: 12.5x), sink-aware 13.6x at <= 0.99% without column 0; text-to-vision-like
blocks 4.8x against the raw float16 block. The same codes under JPEG-LS 13.5x, JPEG-XL lossless
(effort 2) 13.8x, blosc-zstd 11.9x. The ``zstd``, ``rans`` and ``tans`` stages' figures are in the same
file (tans: 20.2x, sink-aware 12.5x, text-to-vision-like 4.4x; host decode per sample in
``benchmarks/results/cache_encode-stage_cpu.json`` (synthetic maps) and
``benchmarks/results/cache_encode-stage-real-maps_cpu.json`` (SmolLM2 maps at S = 1800)).
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import ClassVar

import numcodecs
import numpy as np
import torch
import zarr

from pipeline.cache import entropy, rans, tans
from pipeline.cache.codec_base import as_rows, as_values, check_range, create_array, describe_codec
from pipeline.cache.format import block_rows_for, row_lengths_for

_HEADER = struct.Struct("<fBI")
_SINK, _TRIANGLE, _ZSTD, _WIDE2, _WIDE4, _COLUMNS, _RANS, _TANS = 1, 2, 4, 8, 16, 32, 64, 128
_BYTE_STAGES = _ZSTD | _RANS | _TANS  # blob flags of the stages that hand the device bytes with escapes
ENTROPY_STAGES = ("context", "zstd", "rans", "tans")
COLUMN_STAGES = ("zstd", "rans", "tans")  # their codes reach the host in column order; the device restores rows
# a block's layout in CodeBlocks.layouts: its codes in row order, or in column order of a packed triangle
# (rows 1..S) or of a rectangle (rows x cols)
ROWS, TRIANGLE_COLUMNS, RECT_COLUMNS = 0, 1, 2
_FIRST_CODEC = numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)
_SEARCH_STEPS = 6


@dataclass
class Quantised:
    """One array's blocks after quantisation, on the host: what the device hands to the entropy stage.

    codes: flat codes (uint8 / uint16 / int32), 0 where ``first`` holds the value; shape: the stored
    shape of the sample's block; row_lengths / block_rows: the row structure; steps: float32 per
    block; first: float32 per row (entry 0 of each row, exact) with ``sink``, else None; columns: the
    codes of triangle and rectangle blocks are in column order already (the zstd stage's order, put so
    on the device), else every block is in row order.
    """

    codes: np.ndarray
    shape: tuple
    row_lengths: np.ndarray
    block_rows: np.ndarray
    steps: np.ndarray
    first: np.ndarray | None
    columns: bool = False

    @property
    def size(self) -> int:
        return self.codes.size


@dataclass(frozen=True)
class Part:
    """One stored array of quant2, opened (``ContextQuantCodec.open_part``): its path and attributes, the
    ``blob`` array (a read takes one slice) and the block offsets, read once: byte offset, first row and
    first element of each block (int64 [n_blocks + 1])."""

    path: str
    attrs: dict
    blob: zarr.Array
    blob_offset: np.ndarray
    block_row: np.ndarray
    block_elem: np.ndarray


def _row_starts(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if lengths.size else lengths


def search_steps(x: torch.Tensor, rel_error: float) -> torch.Tensor:
    """The largest step found (a few tries) whose uniform quantisation of each row of ``x`` [B, N]
    meets ``||x - round(x / step) * step|| <= rel_error * ||x||``; float32 [B]. Zero rows get step 1."""
    x = x.float()
    norm = x.square().sum(dim=1).sqrt()
    target = rel_error * norm
    n = max(x.shape[1], 1)
    safe = (2.0 * rel_error / n**0.5) * norm * 0.999  # every entry off by <= step / 2: meets it by construction
    zero = norm == 0
    safe = torch.where(zero, torch.ones_like(safe), safe)

    def error(step):
        return (x - torch.round(x / step[:, None]) * step[:, None]).square().sum(dim=1).sqrt()

    best = safe
    step, prev_step, prev_err = torch.where(zero, safe, (12.0 / n) ** 0.5 * norm * rel_error), None, None
    for _ in range(_SEARCH_STEPS):
        err = error(step)
        feasible = (err <= target) & ~zero
        best = torch.where(feasible & (step > best), step, best)
        ratio = (target * 0.995 / err.clamp_min(1e-30)).clamp(1e-3, 1e3)
        if prev_step is None:
            slope = torch.ones_like(step)
        else:
            slope = (torch.log(err.clamp_min(1e-30) / prev_err.clamp_min(1e-30))
                     / torch.log(step / prev_step).clamp_min(1e-12)).nan_to_num(1.0).clamp(0.25, 2.0)
        prev_step, prev_err = step, err
        step = torch.where(zero, safe, step * ratio ** (1.0 / slope))
    err = error(best)
    return torch.where((err <= target) | zero, best, safe * 0.5)


def _quantise_batch(x: torch.Tensor, first_index: torch.Tensor | None, rel_error: float):
    """x [B, N] float32 -> (codes int32 [B, N], steps [B], first [B, R] or None)."""
    first = None
    if first_index is not None:
        first = x.index_select(1, first_index)
        x = x.index_fill(1, first_index, 0.0)
    steps = search_steps(x, rel_error)
    return torch.round(x / steps[:, None]).to(torch.int32), steps, first


def _to_host(codes: torch.Tensor) -> np.ndarray:
    """Codes to the host at 1 byte per entry (uint8) or 2 (uint16), int32 only beyond 65535."""
    top = int(codes.max()) if codes.numel() else 0  # the one host sync of a quantisation
    if top <= 255:
        return codes.to(torch.uint8).cpu().numpy()
    if top <= 65535:  # int16 bits on the way (any torch build moves them), uint16 on the host
        return codes.to(torch.int16).cpu().numpy().view(np.uint16)
    return codes.cpu().numpy()


@dataclass(frozen=True)
class ContextQuantCodec:
    """``quant2``: per-map uniform quantisation (relative Frobenius error <= rel_error; with ``sink``
    the first entry of every row exact and the bound on the rest) + a 2-D context-model entropy coder."""

    rel_error: float = 0.0099
    sink: bool = False
    entropy: str = "context"
    zstd_level: int = 3
    tv_rel_error: float | None = None
    """the bound of the text-to-vision signals (perception, planning: every signal but ``mid``); None:
    ``rel_error``. Their blocks are diffuse: 4.4x at 1% per block on real maps, 7.2x at 3% (README,
    "Storage"); what a looser bound does to training: README, "The study"."""
    name: ClassVar[str] = "quant2"
    since: ClassVar[int] = 2
    lossless: ClassVar[bool] = False

    def __post_init__(self):
        if not (isinstance(self.rel_error, float) and 1e-4 <= self.rel_error <= 0.5):
            raise ValueError(f"rel_error must be a float in [1e-4, 0.5] (e.g. 0.0099 for < 1% relative Frobenius "
                             f"error per map; below 1e-4 use 'lossless'), got {self.rel_error!r}")
        if self.tv_rel_error is not None and not (isinstance(self.tv_rel_error, float)
                                                  and 1e-4 <= self.tv_rel_error <= 0.5):
            raise ValueError(f"tv_rel_error must be a float in [1e-4, 0.5] (the text-to-vision signals' bound, e.g. "
                             f"0.03; leave it out for rel_error's), got {self.tv_rel_error!r}")
        if not isinstance(self.sink, bool):
            raise ValueError(f"sink must be true or false (store entry 0 of every row exactly), got {self.sink!r}")
        if self.entropy not in ENTROPY_STAGES:
            raise ValueError(f"entropy must be one of {', '.join(ENTROPY_STAGES)} (context: smallest; zstd: "
                             f"decodes ~20x faster; rans: near context's size, decodes ~3x faster; tans: ~6% larger "
                             f"than rans, decodes ~2x faster than rans), "
                             f"got {self.entropy!r}")
        if not (isinstance(self.zstd_level, int) and not isinstance(self.zstd_level, bool)
                and 1 <= self.zstd_level <= 22):
            raise ValueError(f"zstd_level must be an integer in [1, 22] (higher: smaller, slower to encode; "
                             f"decoding speed barely changes), got {self.zstd_level!r}")

    def describe(self) -> dict:
        return describe_codec(self)

    def bound(self, signal: str) -> float:
        """The relative Frobenius error bound per block of ``signal``."""
        return self.rel_error if signal == "mid" or self.tv_rel_error is None else self.tv_rel_error

    # ------------------------------------------------------------------ quantise (device) / encode (host)
    def quantise(self, values: torch.Tensor, row_lengths, block_rows, *, shape=None,
                 rel_error: float | None = None) -> Quantised:
        """Quantise flat ``values`` (a torch tensor on any device, or numpy) block by block, each within
        ``rel_error`` (default: the codec's).

        Consecutive blocks of one row structure (the maps of a sample) go through one batched search.
        """
        rel_error = self.rel_error if rel_error is None else rel_error
        values = torch.as_tensor(values)
        flat = values.reshape(-1)
        if flat.numel() and not bool(torch.isfinite(flat).all() & (flat.min() >= 0)):
            as_values(flat.float().cpu().numpy(), non_negative=True)  # raises the precise error
        lengths, blocks = as_rows(flat.numel(), row_lengths, block_rows, required=True)
        row_bounds = np.concatenate([[0], np.cumsum(blocks)])
        elem_bounds = np.concatenate([[0], np.cumsum(lengths)])[row_bounds]
        codes, steps, firsts = [], [], []
        b = 0
        while b < blocks.size:
            rows = lengths[row_bounds[b]:row_bounds[b + 1]]
            run = b + 1
            while (run < blocks.size and blocks[run] == blocks[b]
                   and np.array_equal(lengths[row_bounds[run]:row_bounds[run + 1]], rows)):
                run += 1
            size = int(rows.sum())
            x = flat[elem_bounds[b]:elem_bounds[run]].reshape(run - b, size).float()
            index = None
            if self.sink:
                index = torch.as_tensor(_row_starts(rows)[rows > 0], device=x.device)
            c, s, f = _quantise_batch(x, index, rel_error)
            if self.entropy in COLUMN_STAGES:  # column order, a gather on the device
                c = _to_columns(c, rows)
            codes.append(c.reshape(-1))
            steps.append(s)
            if f is not None:
                full = torch.zeros(run - b, rows.size, dtype=torch.float32, device=x.device)
                full[:, torch.as_tensor(rows > 0, device=x.device)] = f
                firsts.append(full.reshape(-1))
            b = run
        cat = torch.cat(codes) if codes else torch.zeros(0, dtype=torch.int32)
        return Quantised(codes=_to_host(cat), shape=tuple(values.shape if shape is None else shape),
                         row_lengths=lengths, block_rows=blocks,
                         steps=(torch.cat(steps).cpu().numpy() if steps else np.zeros(0, np.float32)),
                         first=(torch.cat(firsts).cpu().numpy() if self.sink and firsts else
                                (np.zeros(0, np.float32) if self.sink else None)),
                         columns=self.entropy in COLUMN_STAGES)

    def quantise_signal(self, signal: str, block) -> Quantised:
        """``quantise`` of one sample's stored block of ``signal`` (torch on any device, or numpy), its row
        and block structure derived from the signal and shape (pipeline.cache.format), within ``bound(signal)``."""
        return self.quantise(block, row_lengths_for(signal, block.shape), block_rows_for(signal, block.shape),
                             rel_error=self.bound(signal))

    def encode(self, quantised: Quantised, block: int) -> bytes:
        """The blob of block ``block`` of ``quantised`` (thread-safe, releases the GIL)."""
        row_bounds = np.concatenate([[0], np.cumsum(quantised.block_rows)])
        lengths = quantised.row_lengths[row_bounds[block]:row_bounds[block + 1]]
        start = int(quantised.row_lengths[:row_bounds[block]].sum())
        codes = quantised.codes[start:start + int(lengths.sum())]
        triangle = bool(lengths.size) and np.array_equal(lengths, np.arange(1, lengths.size + 1))
        first = b""
        if self.sink:
            first = _FIRST_CODEC.encode(np.ascontiguousarray(quantised.first[row_bounds[block]:row_bounds[block + 1]]))
        flags = (_SINK if self.sink else 0) | (_TRIANGLE if triangle else 0)
        if self.entropy == "zstd":
            stream, stage_flags = _zstd_encode(codes, lengths, triangle, self.zstd_level, quantised.columns)
            flags |= _ZSTD | stage_flags
        elif self.entropy in ("rans", "tans"):
            stream, stage_flags = _rans_encode(codes, lengths, triangle, quantised.columns, self.entropy)
            flags |= (_RANS if self.entropy == "rans" else _TANS) | stage_flags
        else:
            stream = entropy.encode_block(codes, _row_starts(lengths), lengths, skip_first=self.sink,
                                          triangle=triangle)
        return _HEADER.pack(float(quantised.steps[block]), flags, len(first)) + bytes(first) + stream

    # ------------------------------------------------------------------ storage
    def write(self, group: zarr.Group, name: str, values: np.ndarray, *, row_lengths=None, block_rows=None) -> None:
        """Quantise (on the CPU, within ``rel_error``: the cache writer goes through ``quantise_signal``,
        which applies ``tv_rel_error``), encode and store flat float ``values``."""
        values = as_values(values, non_negative=True)
        quantised = self.quantise(torch.from_numpy(values), row_lengths, block_rows)
        self.write_blobs(group, name, [self.encode(quantised, b) for b in range(quantised.block_rows.size)],
                         quantised.row_lengths, quantised.block_rows)

    def write_blobs(self, group: zarr.Group, name: str, blobs: list[bytes], row_lengths, block_rows) -> None:
        """Store encoded blocks (``encode``) with the row structure they were quantised with."""
        lengths = np.asarray(row_lengths, dtype=np.int64)
        blocks = np.asarray(block_rows, dtype=np.int64)
        assert len(blobs) == blocks.size and blocks.sum() == lengths.size
        block_row = np.concatenate([[0], np.cumsum(blocks)]).astype(np.int64)
        block_elem = np.concatenate([[0], np.cumsum(lengths)])[block_row].astype(np.int64)
        node = group.create_group(name, attributes={"codec": self.describe()})
        create_array(node, "blob", np.frombuffer(b"".join(blobs), dtype=np.uint8), None)
        create_array(node, "blob_offset", np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64), 5)
        create_array(node, "block_row", block_row, 5)
        create_array(node, "block_elem", block_elem, 5)

    def open_part(self, group: zarr.Group, name: str) -> Part:
        """The stored array ``name`` of ``group``, its block offsets read (once per part: a reader keeps it
        for every sample of the part, so that a read costs one slice of ``blob``)."""
        node = group[name]
        block_elem = node["block_elem"][:]
        check_range(node, self.describe(), int(block_elem[-1]), 0, 0)  # written with this codec
        return Part(node.path, dict(node.attrs), node["blob"], node["blob_offset"][:], node["block_row"][:],
                    block_elem)

    def read_codes(self, group: zarr.Group | None, name: str, *, start: int, stop: int, row_start: int = 0,
                   row_lengths=None, part: Part | None = None) -> CodeBlocks:
        """The codes of the whole blocks covering elements [start, stop) (rows from ``row_start``) of
        ``group[name]``, or of ``part`` (``open_part``) when given."""
        part = self.open_part(group, name) if part is None else part
        check_range(part, self.describe(), int(part.block_elem[-1]), start, stop)
        if row_lengths is None:
            raise ValueError("quant2 reads whole blocks: pass row_start and the row_lengths of [start, stop)")
        lengths = np.asarray(row_lengths, dtype=np.int64)
        block_row, block_elem = part.block_row, part.block_elem
        b0, b1 = np.searchsorted(block_row, [row_start, row_start + lengths.size])
        if (b1 >= block_row.size or block_row[b0] != row_start or block_row[b1] != row_start + lengths.size
                or block_elem[b0] != start or block_elem[b1] != stop or lengths.sum() != stop - start):
            raise ValueError(f"elements [{start}, {stop}) in rows [{row_start}, {row_start + lengths.size}) are not "
                             f"whole stored blocks at '{part.path}'; quant2 reads a sample's blocks as written")
        offsets = part.blob_offset[b0:b1 + 1]
        data = part.blob[int(offsets[0]):int(offsets[-1])]  # uint8, checksums checked; decoded without a copy
        return decode_blobs(data, offsets - offsets[0], lengths, block_row[b0:b1 + 1] - row_start)

    def read(self, group: zarr.Group | None, name: str, *, start: int, stop: int, row_start: int = 0,
             row_lengths=None, part: Part | None = None) -> np.ndarray:
        return self.read_codes(group, name, start=start, stop=stop, row_start=row_start, row_lengths=row_lengths,
                               part=part).numpy()


# ---------------------------------------------------------------------------- the zstd stage
_FRAME = struct.Struct("<I")
ESCAPE = 255  # a code >= 255 is stored as 255 in the byte plane, its value in the escape list


@functools.cache
def _zstd(level: int) -> numcodecs.Zstd:
    return numcodecs.Zstd(level=level)


@functools.lru_cache(maxsize=4)
def triangle_column_order(size: int) -> np.ndarray:
    """Row-order positions (int64) of a packed lower triangle of ``size`` rows, listed in column order:
    column j holds rows j..size-1, at row-order position i (i + 1) / 2 + j."""
    rows = np.arange(size, dtype=np.int64)
    return np.concatenate([rows[j:] * (rows[j:] + 1) // 2 + j for j in range(size)]) if size else rows


@functools.lru_cache(maxsize=8)
def _triangle_columns(size: int, device: str) -> torch.Tensor:
    return torch.from_numpy(triangle_column_order(size)).to(device)


@functools.lru_cache(maxsize=8)
def _triangle_row_order(size: int, device: str) -> torch.Tensor:
    """The inverse of ``triangle_column_order``: for each row-order position, its column-order position
    (on ``device``, where the reader puts codes back in row order)."""
    i = np.repeat(np.arange(size, dtype=np.int64), np.arange(1, size + 1))
    j = np.arange(size * (size + 1) // 2, dtype=np.int64) - i * (i + 1) // 2
    return torch.from_numpy(j * size - j * (j - 1) // 2 + (i - j)).to(device)


def _layout(lengths: np.ndarray, triangle: bool | None = None) -> tuple[int, int, int]:
    """(kind, rows, cols) of a block with rows ``lengths`` in the zstd stage's order."""
    if triangle is None:
        triangle = bool(lengths.size) and np.array_equal(lengths, np.arange(1, lengths.size + 1))
    if triangle:
        return TRIANGLE_COLUMNS, int(lengths.size), int(lengths.size)
    if lengths.size > 1 and bool((lengths == lengths[0]).all()):
        return RECT_COLUMNS, int(lengths.size), int(lengths[0])
    return ROWS, int(lengths.size), 0


def _to_columns(codes: torch.Tensor, lengths: np.ndarray) -> torch.Tensor:
    """Codes [n, size] of n blocks with rows ``lengths`` in the zstd stage's order (on their device)."""
    kind, rows, cols = _layout(lengths)
    if kind == TRIANGLE_COLUMNS:
        return codes.index_select(1, _triangle_columns(rows, str(codes.device)))
    if kind == RECT_COLUMNS:
        return codes.reshape(-1, rows, cols).transpose(1, 2).reshape(codes.shape[0], -1)
    return codes


def _host_columns(codes: np.ndarray, lengths: np.ndarray, in_columns: bool) -> np.ndarray:
    """One block's host codes in column order (``_to_columns``), unless ``in_columns`` says they already are
    (the cache worker reorders them on the teacher's device)."""
    if in_columns:
        return codes
    return _to_columns(torch.from_numpy(codes.reshape(1, -1)), lengths).numpy().reshape(-1)


def _zstd_encode(codes: np.ndarray, lengths: np.ndarray, triangle: bool, level: int,
                 in_columns: bool) -> tuple[bytes, int]:
    """One block's codes in column order (triangle / rectangle; other row structures in row order;
    ``in_columns``: they already are), one byte per code with ``ESCAPE`` for codes >= 255, as one zstd
    frame, then (if any) the escaped codes (uint16, or uint32 if one exceeds 65535) as a second frame.
    Stream: ``<I`` byte length of the first frame, the frames; returns (stream, flags)."""
    kind, rows, cols = _layout(lengths, triangle)
    codes = _host_columns(codes, lengths, in_columns)
    flags = 0 if kind == ROWS else _COLUMNS
    small = np.minimum(codes, ESCAPE).astype(np.uint8)
    frame = bytes(_zstd(level).encode(small))
    escaped = codes[small == ESCAPE]
    rest = b""
    if escaped.size:
        wide = int(escaped.max()) > 65535
        flags |= _WIDE4 if wide else _WIDE2
        rest = bytes(_zstd(level).encode(escaped.astype("<u4" if wide else "<u2")))
    return _FRAME.pack(len(frame)) + frame + rest, flags


def _rans_columns(lengths: np.ndarray, triangle: bool | None = None) -> tuple[np.ndarray, bool, int]:
    """(column lengths, has_left, flags) of a block in the rans stage: a triangle's columns hold S..1
    codes, a rectangle's ``rows`` each; other row structures are one column in row order."""
    kind, rows, cols = _layout(lengths, triangle)
    if kind == TRIANGLE_COLUMNS:
        return np.arange(rows, 0, -1, dtype=np.int64), True, _COLUMNS
    if kind == RECT_COLUMNS:
        return np.full(cols, rows, dtype=np.int64), True, _COLUMNS
    return np.array([int(lengths.sum())], dtype=np.int64), False, 0


def _rans_encode(codes: np.ndarray, lengths: np.ndarray, triangle: bool, in_columns: bool,
                 stage: str = "rans") -> tuple[bytes, int]:
    """One block's codes in column order (``in_columns``: they already are) through ``pipeline.cache.rans``
    (or ``pipeline.cache.tans``: ``stage``, the same columns); returns (stream, flags)."""
    columns, has_left, flags = _rans_columns(lengths, triangle)
    codes = _host_columns(codes, lengths, in_columns)
    coder = rans if stage == "rans" else tans
    return coder.encode(np.ascontiguousarray(codes), columns, has_left=has_left), flags


def frame_content_size(frame) -> int | None:
    """The decompressed size a zstd frame's header declares (None: not declared or not a zstd frame);
    the zstd format (RFC 8878, section 3.1.1.1): magic, descriptor, window, dictionary id, content size."""
    head = bytes(frame[:18])
    if len(head) < 5 or head[:4] != b"\x28\xb5\x2f\xfd":
        return None
    descriptor = head[4]
    fcs_flag, single, dict_flag = descriptor >> 6, (descriptor >> 5) & 1, descriptor & 3
    at = 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag]
    width = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if not width or len(head) < at + width:
        return None
    value = int.from_bytes(head[at:at + width], "little")
    return value + 256 if width == 2 else value


def _zstd_decode(stream, flags: int, size: int, out: np.ndarray) -> np.ndarray:
    """Fill ``out`` (uint8, contiguous: the block's codes in stored order, ESCAPE where escaped) from one
    stream (bytes-like) of ``_zstd_encode``, zstd writing straight into it; returns the escaped codes (int32, in order)."""
    (n,) = _FRAME.unpack_from(stream)
    frame = memoryview(stream)[_FRAME.size:_FRAME.size + n]
    decoder = _zstd(1)  # the level does not matter to the decoder
    held = frame_content_size(frame)
    if held != size:
        raise ValueError(f"zstd frame holds {held} codes, the block has {size}")
    if size:
        decoder.decode(frame, out=out)
    width = 4 if flags & _WIDE4 else (2 if flags & _WIDE2 else 0)
    if not width:
        return np.zeros(0, np.int32)
    escaped = np.frombuffer(decoder.decode(memoryview(stream)[_FRAME.size + n:]), dtype="<u4" if width == 4 else "<u2")
    return escaped.astype(np.int32)  # their count is checked where they are put back (dequantise)


# ---------------------------------------------------------------------------- decoded blocks
@dataclass
class CodeBlocks:
    """Decoded codes of whole blocks (torch tensors on the CPU) that dequantise on any device.

    codes: flat (uint8, or uint16 carried as int16 bits, or int32); sizes / steps: elements and step
    of each block; first_index / first: flat positions (row order) and exact values of the entries
    stored exactly (``sink``; empty otherwise); layouts: per block (kind, rows, cols), the order its
    codes are in (``ROWS``, or column order of a triangle / rectangle: the zstd stage), empty: all rows;
    escapes: with uint8 codes from the zstd stage, the values of the codes stored as ``ESCAPE``, in order.
    """

    codes: torch.Tensor
    wide: bool
    sizes: torch.Tensor
    steps: torch.Tensor
    first_index: torch.Tensor
    first: torch.Tensor
    layouts: tuple = ()
    escapes: torch.Tensor | None = None

    def pin_memory(self) -> CodeBlocks:
        return CodeBlocks(self.codes.pin_memory(), self.wide, self.sizes, self.steps.pin_memory(),
                          self.first_index.pin_memory(), self.first.pin_memory(), self.layouts,
                          None if self.escapes is None else self.escapes.pin_memory())

    def _row_order(self, codes: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Blocks stored in column order put back in row order (on ``device``)."""
        if not any(kind != ROWS for kind, _, _ in self.layouts):
            return codes
        parts = list(codes.split(self.sizes.tolist()))
        for b, (kind, rows, cols) in enumerate(self.layouts):
            if kind == TRIANGLE_COLUMNS:
                parts[b] = parts[b][_triangle_row_order(rows, str(device))]
            elif kind == RECT_COLUMNS:
                parts[b] = parts[b].reshape(cols, rows).t().reshape(-1)
        return torch.cat(parts)

    def dequantise(self, device=None, non_blocking: bool = False) -> torch.Tensor:
        """float32 values (flat, row order) on ``device``: ``codes * step`` of each block, exact entries put back."""
        device = torch.device("cpu") if device is None else torch.device(device)
        codes = self.codes.to(device, non_blocking=non_blocking)
        if self.escapes is not None and self.escapes.numel():
            codes = codes.to(torch.int32)
            where = codes == ESCAPE
            if int(where.sum()) != self.escapes.numel():
                raise ValueError(f"{int(where.sum())} escaped codes but {self.escapes.numel()} escape values: the "
                                 "zstd stage's streams are inconsistent")
            codes[where] = self.escapes.to(device, non_blocking=non_blocking)
        codes = self._row_order(codes, device)
        values = (codes.to(torch.int32) & 0xFFFF) if self.wide else codes
        steps = self.steps.to(device, non_blocking=non_blocking)
        if self.sizes.numel() and bool((self.sizes == self.sizes[0]).all()):
            values = (values.reshape(self.sizes.numel(), -1).float() * steps[:, None]).reshape(-1)
        else:
            values = values.float() * torch.repeat_interleave(steps, self.sizes.to(device))
        if self.first_index.numel():
            values = values.index_copy(0, self.first_index.to(device, non_blocking=non_blocking),
                                       self.first.to(device, non_blocking=non_blocking))
        return values

    def numpy(self) -> np.ndarray:
        return self.dequantise().numpy()


def _wire(codes: np.ndarray) -> tuple[torch.Tensor, bool]:
    """int32 codes -> the narrowest carrier (uint8; uint16 as int16 bits, flagged wide; int32)."""
    top = int(codes.max()) if codes.size else 0
    if top > 65535:
        return torch.from_numpy(codes), False
    if top > 255:
        return torch.from_numpy(codes.astype(np.uint16).view(np.int16)), True
    return torch.from_numpy(codes.astype(np.uint8)), False


def decode_blobs(data, offsets: np.ndarray, lengths: np.ndarray, block_row: np.ndarray) -> CodeBlocks:
    """Decode consecutive blobs (byte ``offsets`` into ``data``: bytes or a uint8 array, read in place) of
    blocks with rows ``lengths`` (``block_row``: each block's first row, relative). Blobs of the zstd and
    rans / tans stages stay on the host as they are stored (one byte per code, column order, escapes apart): the
    device finishes them (``dequantise``)."""
    data = memoryview(data)
    starts = _row_starts(lengths)
    headers = [_HEADER.unpack_from(data, int(offsets[b])) for b in range(offsets.size - 1)]
    zstd_only = all(flags & _BYTE_STAGES for _, flags, _ in headers)  # byte codes in stored order
    if not zstd_only and any(flags & _BYTE_STAGES for _, flags, _ in headers):
        raise ValueError("blobs of both entropy stages (context, and zstd, rans or tans) in one read: an array is "
                         "written by one codec; the blob flags are damaged (python -m cache_teacher.verify CACHE "
                         "--deep)")
    codes = np.zeros(int(lengths.sum()), dtype=np.uint8 if zstd_only else np.int32)
    steps, sizes, layouts, escapes = [], [], [], []
    first_index, first = [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
    elem = 0
    for b, (step, flags, n_first) in enumerate(headers):
        rows = lengths[block_row[b]:block_row[b + 1]]
        at = int(offsets[b]) + _HEADER.size
        if flags & _SINK:
            kept = rows > 0
            first_index.append(starts[block_row[b]:block_row[b + 1]][kept])
            first.append(np.frombuffer(_FIRST_CODEC.decode(data[at:at + n_first]), dtype=np.float32)[kept])
        at += n_first
        size = int(rows.sum())
        stream = data[at:int(offsets[b + 1])]
        layout = (ROWS, int(rows.size), 0)
        if flags & (_RANS | _TANS):
            columns, has_left, _ = _rans_columns(rows, bool(flags & _TRIANGLE))
            coder = rans if flags & _RANS else tans
            escapes.append(coder.decode(stream, columns, has_left=has_left, out=codes[elem:elem + size]))
            if flags & _COLUMNS:
                layout = _layout(rows, bool(flags & _TRIANGLE))
        elif not flags & _ZSTD:
            entropy.decode_block(stream, _row_starts(rows), rows, skip_first=bool(flags & _SINK),
                                 triangle=bool(flags & _TRIANGLE), codes=codes[elem:elem + size])
        else:
            escapes.append(_zstd_decode(stream, flags, size, codes[elem:elem + size]))
            if flags & _COLUMNS:
                layout = _layout(rows, bool(flags & _TRIANGLE))
        layouts.append(layout)
        steps.append(step)
        sizes.append(size)
        elem += size
    if zstd_only:
        wire, wide, escaped = torch.from_numpy(codes), False, torch.from_numpy(np.concatenate(escapes or [np.zeros(0, np.int32)]))
    else:
        (wire, wide), escaped = _wire(codes), None
    return CodeBlocks(codes=wire, wide=wide, sizes=torch.tensor(sizes, dtype=torch.int64),
                      steps=torch.tensor(steps, dtype=torch.float32),
                      first_index=torch.from_numpy(np.concatenate(first_index)),
                      first=torch.from_numpy(np.concatenate(first)), layouts=tuple(layouts), escapes=escaped)
