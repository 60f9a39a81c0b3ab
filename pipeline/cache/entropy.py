"""The entropy stage of codec ``quant2``: an adaptive binary arithmetic coder over a map's code image.

A block (one map) is a set of rows (row r holds ``lengths[r]`` codes, flat at ``offsets[r]``); a
packed lower triangle has rows of 1..S, a text-to-vision block rows of n_vision. Entry 0 of every
row (the key at position 0, the attention sink in a triangle) is coded on its own (predicted from
the row above) or skipped when the codec stores it exactly; entries 1.. form the code image.

Model, per entry x at row r, column j (neighbours from rows already coded, so the decoder sees them):
- ``col``: a running mean of column j over the rows above (key salience persists down the rows),
- ``up`` (row r-1, column j), ``left`` (row r, column j-1), and in a triangle the distance to the
  diagonal (recent keys: 0, 1, 2-3, >= 4);
- a zero flag in the context (col, up, left, distance); a non-zero magnitude as
  ``(x - 1) >> k`` in unary bins (12, then Elias-gamma escape) in contexts of the prediction
  ``(2 col + up + left) / 4``, with ``k`` low bits sent raw where the prediction is large (LOCO-I's
  adaptive Golomb parameter).
Each binary context keeps two probabilities (adaptation rates 1/16 and 1/128, averaged); the coder is
a carry-less 32-bit binary arithmetic coder (the PAQ family's scheme). Everything is integer arithmetic, so
encoder and decoder agree bit for bit on every machine. Compiled with numba (``nogil``: the cache
job's writer runs blocks in a thread pool).
"""

from __future__ import annotations

import numpy as np
from numba import njit

_PBITS = 16
_ONE = 1 << _PBITS
_NK = 12  # unary magnitude bins before the escape
_NP = 12  # prediction levels of the magnitude contexts
_NE = 24  # Elias-gamma prefix contexts
_NQE, _NQ, _ND = 11, 6, 4  # column-mean, neighbour and diagonal-distance levels of the zero flag
_Z = _NQE * _NQ * _NQ * _ND
_M = _Z + 2
_E = _M + _NP * _NK
_FIRST = _E + _NP * _NE  # contexts of entry 0 of each row: zero flag, then magnitude and escape
N_CONTEXTS = _FIRST + 2 + _NP * _NK + _NP * _NE


def _levels(edges: list[int]) -> np.ndarray:
    """Lookup table value -> level for values 0..edges[-1] (level i: edges[i-1] <= v < edges[i])."""
    return np.searchsorted(np.asarray(edges), np.arange(edges[-1] + 1), side="right").astype(np.int64)


_LEVEL = _levels([1, 2, 3, 5, 9])  # 0, 1, 2, 3-4, 5-8, 9+ -> 0..5
_COL_LEVEL = _levels([2, 4, 8, 12, 16, 24, 32, 48, 64, 128])  # column mean in 1/16 code units -> 0..10
_PRED_LEVEL = _levels([1, 2, 3, 4, 5, 7, 10, 15, 23, 35, 61])  # 0, 1, 2, 3, 4, 5-6, ..., 61+ -> 0..11


@njit(cache=True, inline="always")
def _level(v):
    return _LEVEL[min(v, 9)]


@njit(cache=True, inline="always")
def _log2(v):
    n = 0
    while v > 1:
        v >>= 1
        n += 1
    return n


@njit(cache=True, inline="always")
def _pred_level(p):
    return _PRED_LEVEL[min(p, 61)]


# ---------------------------------------------------------------------------- binary arithmetic coder
# Carry-less (the PAQ family's scheme): the interval [x1, x2] of 32-bit integers narrows by each bit's
# probability; while both ends share their top byte it is output. State in local scalars (registers):
# encoder (x1, x2, output position), decoder (x1, x2, x, input position). probs[ctx] holds P(bit = 1)
# twice, in 1/65536, adapting at rates 1/16 and 1/128; their mean codes the bit.
_MASK = 0xFFFFFFFF


@njit(cache=True, inline="always")
def _p1(probs, ctx, bit):
    """P(1) of ``ctx`` before this bit; adapts it to ``bit``."""
    p = (probs[ctx, 0] + probs[ctx, 1]) >> 1
    if bit:
        probs[ctx, 0] += (_ONE - probs[ctx, 0]) >> 4
        probs[ctx, 1] += (_ONE - probs[ctx, 1]) >> 7
    else:
        probs[ctx, 0] -= probs[ctx, 0] >> 4
        probs[ctx, 1] -= probs[ctx, 1] >> 7
    return p


@njit(cache=True, inline="always")
def _code(e, out, p, bit):
    x1, x2, pos = e
    mid = x1 + ((x2 - x1) >> _PBITS) * p
    if bit:
        x2 = mid
    else:
        x1 = mid + 1
    while ((x1 ^ x2) & 0xFF000000) == 0:
        if pos < out.size:  # past the end: the caller retries with a larger buffer
            out[pos] = x2 >> 24
        pos += 1
        x1 = (x1 << 8) & _MASK
        x2 = ((x2 << 8) & _MASK) | 0xFF
    return (x1, x2, pos)


@njit(cache=True, inline="always")
def _put(e, out, probs, ctx, bit):
    return _code(e, out, _p1(probs, ctx, bit), bit)


@njit(cache=True, inline="always")
def _put_raw(e, out, value, nbits):
    for i in range(nbits - 1, -1, -1):
        e = _code(e, out, _ONE // 2, (value >> i) & 1)
    return e


@njit(cache=True, inline="always")
def _decide(x1, x2, x, pos, data, p):
    mid = x1 + ((x2 - x1) >> _PBITS) * p
    bit = 1 if x <= mid else 0
    if bit:
        x2 = mid
    else:
        x1 = mid + 1
    while ((x1 ^ x2) & 0xFF000000) == 0:
        x1 = (x1 << 8) & _MASK
        x2 = ((x2 << 8) & _MASK) | 0xFF
        x = ((x << 8) & _MASK) | (data[pos] if pos < data.size else 0)  # a truncated stream reads zeros
        pos += 1
    return x1, x2, x, pos, bit


@njit(cache=True, inline="always")
def _get(d, data, probs, ctx):
    x1, x2, x, pos, bit = _decide(d[0], d[1], d[2], d[3], data, (probs[ctx, 0] + probs[ctx, 1]) >> 1)
    _p1(probs, ctx, bit)
    return (x1, x2, x, pos), bit


@njit(cache=True, inline="always")
def _get_raw(d, data, nbits):
    x1, x2, x, pos = d
    value = 0
    for _ in range(nbits):
        x1, x2, x, pos, bit = _decide(x1, x2, x, pos, data, _ONE // 2)
        value = (value << 1) | bit
    return (x1, x2, x, pos), value


# ---------------------------------------------------------------------------- the model
@njit(cache=True, inline="always")
def _golomb_k(pred):
    return max(_log2(pred) - 1, 0)


@njit(cache=True, inline="always")
def _put_magnitude(e, out, probs, m_base, e_base, pred, x):
    """x >= 1 given the prediction ``pred``."""
    k = _golomb_k(pred)
    level = _pred_level(pred)
    m = (x - 1) >> k
    base = m_base + level * _NK
    for i in range(_NK):
        if m == i:
            e = _put(e, out, probs, base + i, 0)
            break
        e = _put(e, out, probs, base + i, 1)
    if m >= _NK:
        v = m - _NK + 1
        nbits = _log2(v)
        ebase = e_base + level * _NE
        for i in range(nbits):
            e = _put(e, out, probs, ebase + min(i, _NE - 1), 1)
        e = _put(e, out, probs, ebase + min(nbits, _NE - 1), 0)
        e = _put_raw(e, out, v - (1 << nbits), nbits)
    if k > 0:
        e = _put_raw(e, out, (x - 1) & ((1 << k) - 1), k)
    return e


@njit(cache=True, inline="always")
def _get_magnitude(d, data, probs, m_base, e_base, pred):
    k = _golomb_k(pred)
    level = _pred_level(pred)
    base = m_base + level * _NK
    m = _NK
    for i in range(_NK):
        d, bit = _get(d, data, probs, base + i)
        if bit == 0:
            m = i
            break
    if m == _NK:
        ebase = e_base + level * _NE
        nbits = 0
        d, bit = _get(d, data, probs, ebase)
        while bit == 1:
            nbits += 1
            d, bit = _get(d, data, probs, ebase + min(nbits, _NE - 1))
        d, v = _get_raw(d, data, nbits)
        m = (1 << nbits) + v + _NK - 1
    x = (m << k) + 1
    if k > 0:
        d, v = _get_raw(d, data, k)
        x += v
    return d, x


@njit(cache=True, inline="always")
def _zero_context(col16, up, left, dist):
    return ((_COL_LEVEL[min(col16, 128)] * _NQ + _level(up)) * _NQ + _level(left)) * _ND + dist


@njit(cache=True, inline="always")
def _distance(j, length, triangle):
    if not triangle:
        return 3
    d = length - 1 - j
    return d if d < 2 else (2 if d < 4 else 3)


@njit(nogil=True, cache=True)
def encode(codes, offsets, lengths, skip_first, triangle, out):
    """Code the rows of one block into ``out`` (uint8); returns the stream's length (larger than
    out.size: it did not fit, nothing past out.size was written). codes: flat non-negative integers; row r = codes[offsets[r]:][:lengths[r]]."""
    probs = np.full((N_CONTEXTS, 2), _ONE // 2, dtype=np.int64)
    e = (np.int64(0), np.int64(_MASK), np.int64(0))
    width = lengths.max() if lengths.size else 0
    ring = np.zeros((2, width + 2), dtype=np.int64)
    col = np.zeros(width + 2, dtype=np.int64)
    first_prev = 0
    for r in range(lengths.size):
        length, base = lengths[r], offsets[r]
        cur, prev = ring[r & 1], ring[(r + 1) & 1]
        cur[:] = 0
        if length > 0 and not skip_first:
            x = codes[base]
            e = _put(e, out, probs, _FIRST + min(first_prev, 1), 1 if x > 0 else 0)
            if x > 0:
                e = _put_magnitude(e, out, probs, _FIRST + 2, _FIRST + 2 + _NP * _NK, first_prev, x)
            first_prev = x
        for j in range(1, length):
            x = codes[base + j]
            up, left = prev[j + 1], cur[j]
            dist = _distance(j, length, triangle)
            e = _put(e, out, probs, _zero_context(col[j + 1], up, left, dist), 1 if x > 0 else 0)
            if x > 0:
                e = _put_magnitude(e, out, probs, _M, _E, (2 * (col[j + 1] >> 4) + up + left + 2) >> 2, x)
            cur[j + 1] = x
            if dist > 0 or not triangle:
                col[j + 1] += (x * 16 - col[j + 1]) >> 2
    x1, pos = e[0], e[2]
    for i in range(4):  # x1 itself: the decoder, reading zeros past the end, lands inside [x1, x2]
        if pos < out.size:
            out[pos] = (x1 >> (24 - 8 * i)) & 0xFF
        pos += 1
    return pos


@njit(nogil=True, cache=True)
def decode(data, offsets, lengths, skip_first, triangle, codes):
    """Inverse of ``encode``: fill ``codes`` (flat; entry 0 of each row untouched with skip_first) from
    the stream ``data``; returns the bytes it consumed (more than data.size: the stream was truncated)."""
    probs = np.full((N_CONTEXTS, 2), _ONE // 2, dtype=np.int64)
    x = np.int64(0)
    for i in range(4):
        x = (x << 8) | (data[i] if i < data.size else 0)
    d = (np.int64(0), np.int64(_MASK), x, np.int64(4))
    width = lengths.max() if lengths.size else 0
    ring = np.zeros((2, width + 2), dtype=np.int64)
    col = np.zeros(width + 2, dtype=np.int64)
    first_prev = 0
    for r in range(lengths.size):
        length, base = lengths[r], offsets[r]
        cur, prev = ring[r & 1], ring[(r + 1) & 1]
        cur[:] = 0
        if length > 0 and not skip_first:
            d, x = _get(d, data, probs, _FIRST + min(first_prev, 1))
            if x == 1:
                d, x = _get_magnitude(d, data, probs, _FIRST + 2, _FIRST + 2 + _NP * _NK, first_prev)
            codes[base] = x
            first_prev = x
        for j in range(1, length):
            up, left = prev[j + 1], cur[j]
            dist = _distance(j, length, triangle)
            d, x = _get(d, data, probs, _zero_context(col[j + 1], up, left, dist))
            if x == 1:
                d, x = _get_magnitude(d, data, probs, _M, _E, (2 * (col[j + 1] >> 4) + up + left + 2) >> 2)
            codes[base + j] = x
            cur[j + 1] = x
            if dist > 0 or not triangle:
                col[j + 1] += (x * 16 - col[j + 1]) >> 2
    return d[3]


def encode_block(codes: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, *, skip_first: bool,
                 triangle: bool) -> bytes:
    """The coded stream of one block (see ``encode``); the buffer grows until the stream fits."""
    codes = np.ascontiguousarray(codes, dtype=np.int32)  # one compiled specialisation
    size = codes.size // 2 + 1024
    while True:
        out = np.empty(size, dtype=np.uint8)
        n = encode(codes, offsets, lengths, skip_first, triangle, out)
        if n <= size:
            return out[:n].tobytes()
        size = n


def decode_block(stream: bytes, offsets: np.ndarray, lengths: np.ndarray, *, skip_first: bool, triangle: bool,
                 codes: np.ndarray) -> None:
    """Fill ``codes`` (int32, flat, the block's rows at ``offsets``) from one stream of ``encode_block``."""
    used = decode(np.frombuffer(stream, dtype=np.uint8), offsets, lengths, skip_first, triangle, codes)
    if used > len(stream):
        raise ValueError(f"entropy stream of {len(stream)} bytes is truncated (the decoder needed {used})")
