"""The ``rans`` entropy stage of codec ``quant2``: zero runs and non-zero codes of a map in column order,
context-modelled with static per-map frequency tables and coded with rANS (numba, GIL-free).

A block's codes come in COLUMN order (as for the ``zstd`` stage: a key's salience persists down the
rows). Columns are bottom-aligned (column j holds the last ``lengths[j]`` rows: a packed triangle's
column j holds rows j..S-1, a rectangle's every row), so the entry left of index k of column j is
index k + lengths[j-1] - lengths[j] of column j-1, ``lengths[j]`` positions back in the flat order.
Most codes are 0 (92% on real maps), so the coder spends its work per non-zero code, not per entry:
each column is a sequence of tokens

- a zero run before the next non-zero code: ``EOC`` (zeros to the end of the column), ``MATCH`` (as
  many zeros as the left column has from this row to its next non-zero: query rows that attend
  broadly persist across keys), or the length in buckets (0..7 exact, then two buckets per octave,
  the low bits raw),
- the non-zero code (1..16 exact, then two buckets per octave, the low bits raw);

a run's context is the distance to the left column's next non-zero (bucketed) and the code above
(the last one coded in this column, or the start of the column); a code's context is the code above
and the code to the left (each bucketed). Two passes per block: count the tokens, then code them with
one rANS state (32-bit, 16-bit renormalisation, probabilities in 1/2048) whose frequency tables are
stored in the stream; low bits go to a separate raw bit stream. Decoding writes only the non-zero codes
into a zero-filled byte array (``ESCAPE`` where a code is >= 255, its value in the escape list), the
same form as the ``zstd`` stage, so the device finishes both the same way.

Stream: ``<IIII`` (table bytes, rANS words, raw bit bytes, escaped codes), the tables (per context:
the number of symbols listed, then each symbol's frequency, LEB128), the rANS words (uint16), the raw
bits (LSB first).
"""

from __future__ import annotations

import struct

import numpy as np
from numba import njit

from pipeline.cache.entropy import _log2

_SCALE = 11
_M = 1 << _SCALE
_L = 1 << 16  # rANS state in [_L, _L << 16)
_A = 72  # symbols per context (run and code alphabets share the table width)
_EOC, _MATCH = 0, 1
_NDL, _NUP = 11, 6  # run contexts: left-distance levels (incl. none and no left column), code-above levels
_NV = 7  # code contexts: levels of the code above and of the code to the left
_RUN_CTX = _NDL * _NUP
N_CONTEXTS = _RUN_CTX + _NV * _NV
ESCAPE = 255
_HEAD = struct.Struct("<IIII")


@njit(cache=True, inline="always")
def _bucket(u, direct):
    """u >= 0 -> (symbol, raw bits, raw value): u < direct exact, then two buckets per octave."""
    if u < direct:
        return u, 0, 0
    e = _log2(u)
    nb = e - 1
    return direct + (e - _log2(direct)) * 2 + ((u >> nb) & 1), nb, u & ((1 << nb) - 1)


@njit(cache=True, inline="always")
def _unbucket_base(sym, direct):
    """symbol >= direct -> (base value, raw bits)."""
    t = sym - direct
    e = _log2(direct) + (t >> 1)
    return (1 << e) | ((t & 1) << (e - 1)), e - 1


@njit(cache=True, inline="always")
def _vlevel(v):
    if v < 3:
        return v
    if v < 5:
        return 3
    if v < 9:
        return 4
    if v < 17:
        return 5
    return 6


@njit(cache=True, inline="always")
def _up_level(v):
    """Code above a run: 0 at the start of the column, else 1, 2, 3-4, 5-8, 9+ -> 1..5."""
    return min(_vlevel(v), 5)


@njit(cache=True, inline="always")
def _dlevel(d):
    """Left column's distance to its next non-zero: -2 no left column, -1 none, else 0..8."""
    if d < 0:
        return d + 2
    if d < 17:  # 0, 1, 2, 3-4, 5-8, 9-16: the code levels, two up
        return 2 + _vlevel(d)
    if d < 33:
        return 8
    if d < 129:
        return 9
    return 10


@njit(cache=True, inline="always")
def _advance(prev, n_prev, p, k, shift):
    """First index of the left column's non-zero list at or after row index k of this column, and the
    distance to it (-1: none)."""
    while p < n_prev and prev[p] - shift < k:
        p += 1
    return p, (prev[p] - shift - k if p < n_prev else -1)


# ---------------------------------------------------------------------------- encoder
@njit(cache=True, inline="always")
def _put_bits(bits, state, value, nb):
    """Append nb raw bits (LSB first); state = (accumulator, its bits, bytes written)."""
    acc, n, pos = state
    acc |= value << n
    n += nb
    while n >= 8:
        bits[pos] = acc & 0xFF
        acc >>= 8
        n -= 8
        pos += 1
    return acc, n, pos


@njit(nogil=True, cache=True)
def _tokens(codes, lengths, has_left, tokens, bits, counts):
    """Pass 1: the token sequence (context * _A + symbol), raw bits and counts; returns (tokens, bit
    bytes, escaped codes)."""
    width = lengths.max() if lengths.size else 0
    prev = np.empty(width + 1, np.int64)
    cur = np.empty(width + 1, np.int64)
    n_prev, nt, escaped = 0, 0, 0
    bs = (np.int64(0), np.int64(0), np.int64(0))
    base = 0
    for j in range(lengths.size):
        length = lengths[j]
        left = has_left and j > 0
        shift = lengths[j - 1] - length if left else 0
        k, up, p, n_cur = 0, 0, 0, 0
        while k < length:
            r = 0
            while k + r < length and codes[base + k + r] == 0:
                r += 1
            d = -2
            if left:
                p, d = _advance(prev, n_prev, p, k, shift)
            ctx = _dlevel(d) * _NUP + _up_level(up)
            if k + r == length:
                sym = _EOC
            elif r == d:
                sym = _MATCH
            else:
                s, nb, extra = _bucket(r, 8)
                sym = 2 + s
                bs = _put_bits(bits, bs, extra, nb)
            tokens[nt] = ctx * _A + sym
            counts[ctx, sym] += 1
            nt += 1
            if sym == _EOC:
                break
            k += r
            x = np.int64(codes[base + k])
            above = up if r == 0 else 0
            lv = min(np.int64(codes[base + k - length]), ESCAPE) if left else 0
            ctx = _RUN_CTX + _vlevel(above) * _NV + _vlevel(lv)
            s, nb, extra = _bucket(x - 1, 16)
            bs = _put_bits(bits, bs, extra, nb)
            tokens[nt] = ctx * _A + s
            counts[ctx, s] += 1
            nt += 1
            escaped += x >= ESCAPE
            cur[n_cur] = k
            n_cur += 1
            up = x
            k += 1
        prev, cur, n_prev = cur, prev, n_cur
        base += length
    acc, n, pos = bs
    if n > 0:
        bits[pos] = acc & 0xFF
        pos += 1
    return nt, pos, escaped


@njit(nogil=True, cache=True)
def normalise(counts, freq, total):
    """Frequencies summing to `total` per used context (every seen symbol >= 1), the largest absorbing the
    rounding (shared with the tans stage)."""
    for c in range(counts.shape[0]):
        seen = counts[c].sum()
        if seen == 0:
            continue
        s = 0
        for a in range(counts.shape[1]):
            if counts[c, a]:
                freq[c, a] = max(1, counts[c, a] * total // seen)
                s += freq[c, a]
        while s != total:
            big = np.argmax(freq[c])
            if s < total:
                freq[c, big] += total - s
                s = total
            else:
                cut = min(s - total, freq[c, big] - 1)
                if cut == 0:  # cannot happen while a table has far fewer symbols than `total`; guards the loop
                    break
                freq[c, big] -= cut
                s -= cut


@njit(nogil=True, cache=True)
def _code(tokens, nt, freq, words):
    """Pass 2: rANS over the tokens in reverse; returns the first word used (words fill from the end)."""
    cum = np.zeros_like(freq)
    for c in range(freq.shape[0]):
        for a in range(1, _A):
            cum[c, a] = cum[c, a - 1] + freq[c, a - 1]
    x = np.int64(_L)
    pos = words.size
    for t in range(nt - 1, -1, -1):
        c, a = tokens[t] // _A, tokens[t] % _A
        f = freq[c, a]
        if x >= ((_L >> _SCALE) << 16) * f:
            pos -= 1
            words[pos] = x & 0xFFFF
            x >>= 16
        x = ((x // f) << _SCALE) + (x % f) + cum[c, a]
    pos -= 2
    words[pos] = x >> 16
    words[pos + 1] = x & 0xFFFF
    return pos


@njit(nogil=True, cache=True)
def _tables(freq, out):
    """Frequency tables, LEB128 per context: symbols listed (up to the last used), their frequencies."""
    pos = 0
    for c in range(freq.shape[0]):
        top = 0
        for a in range(_A):
            if freq[c, a]:
                top = a + 1
        for v in range(top + 1):
            value = top if v == 0 else freq[c, v - 1]
            while value >= 128:
                out[pos] = (value & 127) | 128
                value >>= 7
                pos += 1
            out[pos] = value
            pos += 1
    return pos


def encode(codes: np.ndarray, lengths: np.ndarray, *, has_left: bool) -> bytes:
    """The stream of one block's codes (flat, column order: column j is the next ``lengths[j]`` codes,
    bottom-aligned; ``has_left``: column j-1 is the left neighbour of column j)."""
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    n = int(lengths.sum())
    tokens = np.empty(2 * n + lengths.size, np.int32)
    bits = np.zeros(5 * n + 16, np.uint8)  # raw bits: <= 31 per code, fewer per entry for runs
    counts = np.zeros((N_CONTEXTS, _A), np.int64)
    nt, nbits, escaped = _tokens(codes, lengths, has_left, tokens, bits, counts)
    freq = np.zeros((N_CONTEXTS, _A), np.int64)
    normalise(counts, freq, _M)
    words = np.empty(nt + 2, np.uint16)
    first = _code(tokens, nt, freq, words)
    table = np.empty(N_CONTEXTS * (_A + 1) * 2, np.uint8)
    nt_bytes = _tables(freq, table)
    return (_HEAD.pack(nt_bytes, words.size - first, nbits, escaped) + table[:nt_bytes].tobytes()
            + words[first:].astype("<u2").tobytes() + bits[:nbits].tobytes())


# ---------------------------------------------------------------------------- decoder
@njit(nogil=True, cache=True)
def _read_tables(data, freq, cum, slots):
    """Parse the tables; returns bytes used, or -1 if they are malformed."""
    pos = 0
    for c in range(freq.shape[0]):
        top = -1
        for v in range(_A + 2):
            value, shift = 0, 0
            while True:
                if pos >= data.size or shift > 28:
                    return -1
                b = data[pos]
                pos += 1
                value |= np.int64(b & 127) << shift
                shift += 7
                if b < 128:
                    break
            if v == 0:
                if value > _A:
                    return -1
                top = value
            else:
                freq[c, v - 1] = value
            if v == top:
                break
        total = 0
        for a in range(top):
            cum[c, a] = total
            if total + freq[c, a] > _M:
                return -1
            for s in range(total, total + freq[c, a]):
                slots[c, s] = a
            total += freq[c, a]
        if top and total != _M:
            return -1
    return pos


@njit(cache=True, inline="always")
def _symbol(x, w, w_end, data, slots, fc, ctx):
    """One rANS symbol of context ``ctx``: (state, word position, symbol); symbol -1: inconsistent."""
    s = x & (_M - 1)
    a = slots[ctx, s]
    entry = fc[ctx, a]  # frequency << 16 | cumulative frequency
    f = entry >> 16
    if f == 0:
        return x, w, -1
    x = f * (x >> _SCALE) + s - (entry & 0xFFFF)
    if x < _L:
        if w + 2 > w_end:
            return x, w, -1
        x = (x << 16) | np.int64(data[w]) | (np.int64(data[w + 1]) << 8)
        w += 2
    return x, w, np.int64(a)


@njit(cache=True, inline="always")
def _bits(acc, nacc, b, b_end, data, nb):
    """nb raw bits: (accumulator, its bits, byte position, value); value -1: the bits ran out."""
    while nacc < nb:
        if b >= b_end:
            return acc, nacc, b, np.int64(-1)
        acc |= np.int64(data[b]) << nacc
        b += 1
        nacc += 8
    value = acc & ((np.int64(1) << nb) - 1)
    return acc >> nb, nacc - nb, b, value


@njit(nogil=True, cache=True)
def _decode(data, tables_end, n_words, n_bits, lengths, has_left, out, escapes):
    """Fill the non-zero codes of ``out`` (uint8, zero-filled) and ``escapes``; returns 0, or -1 if the
    stream is inconsistent (a run past its column, an unused context, truncated parts)."""
    freq = np.zeros((N_CONTEXTS, _A), np.int64)
    cum = np.zeros((N_CONTEXTS, _A), np.int64)
    slots = np.zeros((N_CONTEXTS, _M), np.uint8)
    if _read_tables(data[:tables_end], freq, cum, slots) != tables_end:
        return -1
    fc = (freq << 16) | cum
    w = tables_end  # rANS words, little-endian uint16
    w_end = tables_end + 2 * n_words
    b, b_end = w_end, w_end + n_bits
    if n_words < 2 or b_end != data.size:
        return -1
    x = (((np.int64(data[w]) | (np.int64(data[w + 1]) << 8)) << 16) | np.int64(data[w + 2])
         | (np.int64(data[w + 3]) << 8))
    w += 4
    acc, nacc = np.int64(0), np.int64(0)
    width = lengths.max() if lengths.size else 0
    prev = np.empty(width + 1, np.int64)
    cur = np.empty(width + 1, np.int64)
    n_prev, n_esc, base = 0, 0, 0
    for j in range(lengths.size):
        length = lengths[j]
        left = has_left and j > 0
        shift = lengths[j - 1] - length if left else 0
        k, up, p, n_cur = 0, 0, 0, 0
        while k < length:
            d = -2
            if left:
                p, d = _advance(prev, n_prev, p, k, shift)
            x, w, a = _symbol(x, w, w_end, data, slots, fc, _dlevel(d) * _NUP + _up_level(up))
            if a <= _MATCH:
                if a < 0:
                    return -1
                if a == _EOC:
                    break
                r = d
            elif a < 10:
                r = a - 2
            else:
                r, nb = _unbucket_base(a - 2, 8)
                acc, nacc, b, extra = _bits(acc, nacc, b, b_end, data, nb)
                r += extra
            if r < 0 or r >= length - k:
                return -1
            above = up if r == 0 else 0
            k += r
            lv = np.int64(out[base + k - length]) if left else 0
            x, w, a = _symbol(x, w, w_end, data, slots, fc, _RUN_CTX + _vlevel(above) * _NV + _vlevel(lv))
            if a < 16:
                if a < 0:
                    return -1
                v = a + 1
            else:
                v, nb = _unbucket_base(a, 16)
                acc, nacc, b, extra = _bits(acc, nacc, b, b_end, data, nb)
                if extra < 0:
                    return -1
                v += 1 + extra
            if v >= ESCAPE:
                if n_esc >= escapes.size:
                    return -1
                escapes[n_esc] = v
                n_esc += 1
                out[base + k] = ESCAPE
            else:
                out[base + k] = v
            cur[n_cur] = k
            n_cur += 1
            up = v
            k += 1
        prev, cur, n_prev = cur, prev, n_cur
        base += length
    return 0 if n_esc == escapes.size and x == _L and w == w_end else -1


def decode(stream, lengths: np.ndarray, *, has_left: bool, out: np.ndarray) -> np.ndarray:
    """Fill ``out`` (uint8, ZERO-FILLED, the block's codes in column order) from one stream of ``encode``;
    returns the escaped codes (int32, in order: their bytes in ``out`` hold ``ESCAPE``)."""
    data = np.frombuffer(stream, dtype=np.uint8)
    if data.size < _HEAD.size:
        raise ValueError(f"rans stream of {data.size} bytes is shorter than its header")
    n_table, n_words, n_bits, n_esc = _HEAD.unpack_from(data)
    escapes = np.zeros(n_esc, np.int32)
    body = data[_HEAD.size:]
    if _decode(body, n_table, n_words, n_bits, np.ascontiguousarray(lengths, dtype=np.int64), has_left, out,
               escapes):
        raise ValueError(f"rans stream of {data.size} bytes is damaged or truncated (it does not decode to the "
                         f"block's {out.size} codes)")
    return escapes
