"""The ``tans`` entropy stage of codec ``quant2``: one table-decoded symbol per non-zero code.

The ``rans`` stage's column order (``pipeline.cache.rans``: bottom-aligned columns, so the entry left of
index k of column j is ``lengths[j]`` positions back in the flat order) and zero runs, but a zero run
and the code after it are ONE joint symbol (``EOC``: zeros to the end of the column, or the run length
bucketed (0..7 exact, then two buckets per octave, the low bits raw) x code level 1..15 or "16 and
above", as JPEG's (run, size) pairs): the decoder spends one table lookup per non-zero code instead of
two rANS steps. Codes >= ``_NCV`` take a second symbol (the excess, bucketed) in the context of the code
above and the code to the left. The joint symbol's context is the code left of the run's first entry
(zero or not: one comparison on the decoder's dependency chain) and the code above (the last one in
this column).

Format 2 (written since 2026-12-06): code levels 1..15 in the joint symbol and the left context as
none / zero / non-zero. Format 1 (still read): levels 1..7 and the left code's level (none, 0, 1, 2,
3-4, 5-8, 9-16, 17+), from a lookup. On 23 real SmolLM2 maps (entropy stage alone) format 2 has 8%
fewer symbols and decodes in ~0.065 core-s against ~0.10 for format 1 (the levels: -10%, unsigned array
indices sparing numba's negative-index checks: -12%, the run base inside the table entry: -5%, the
comparison: -20%), for 3.2% more bytes.

Measured figures: README "Storage" and ``benchmarks/results/cache_real-maps_smollm2.json``,
``cache_encode-stage_cpu.json``, ``cache_encode-stage-real-maps_cpu.json``.

Coder: tANS (table ANS, as zstd's FSE): one state in [L, 2L) shared by every table, L = 1024 (L = 512:
6% larger on real maps); decoding a symbol is one lookup of a uint64 entry (state bits to read,
next-state base, raw bits, code level, and the run bucket's or excess bucket's base) and one read from
a forward bit stream that interleaves each symbol's state bits with its raw low bits (run and code
remainders), read with two aligned 64-bit loads. Static per-block frequency tables are stored in the
stream.

Stream: ``<IIIIH`` (table bytes, bits in the bit stream, events, escaped codes, final state - L, plus
0x8000 in format 2), the tables (per table: used symbols, then per used symbol the gap to the previous
one and frequency - 1, LEB128), the bit stream (uint64 little-endian words).
"""

from __future__ import annotations

import struct

import numpy as np
from numba import njit

from pipeline.cache.entropy import _log2
from pipeline.cache.rans import _bucket, _unbucket_base, _up_level, _vlevel, normalise

_LOG = 10
_L = 1 << _LOG
_NCV = 16  # code levels in a joint symbol: 1..15 exact, 16 = "16 and above" (a second symbol follows)
_NCV_V1 = 8  # the same in streams of format 1 (read only): 1..7 exact, 8 = "8 and above"
_V2 = 1 << 15  # header flag (in the final state's field) of format 2
_NRUN = 64  # run-length buckets up to 2^31 (8 exact, then two per octave)
_A_MAIN = 1 + _NRUN * _NCV  # EOC, then (run bucket, code level)
_A_BIG = 64  # excess code buckets up to 2^31
_NLEFT, _NUP, _NV = 8, 6, 7  # joint contexts: left code (none, or its level; format 2: none, 0, > 0) x code above
N_MAIN = _NLEFT * _NUP
N_TABLES = N_MAIN + _NV * _NV
_A = _A_MAIN  # table width
ESCAPE = 255
_HEAD = struct.Struct("<IIIIH")


@njit(cache=True, inline="always")
def _bitlen(v):
    return _log2(v) + 1


# ---------------------------------------------------------------------------- symbol tables (both sides)
@njit(cache=True)
def _buckets():
    """Per bucket symbol (of a zero run or of a code's excess over ``_NCV``): its base value and raw bits
    (0..7 exact, then two buckets per octave)."""
    base = np.zeros(_A_BIG, np.int64)
    bits = np.zeros(_A_BIG, np.int64)
    for s in range(_A_BIG):
        if s < 8:
            base[s] = s
        else:
            base[s], bits[s] = _unbucket_base(s, 8)
    return base, bits


@njit(cache=True)
def _main_symbols(ncv):
    """Per joint symbol of a stream with ``ncv`` code levels: (run base, run raw bits, code level 1..ncv;
    0 for EOC)."""
    rbase = np.zeros(_A_MAIN, np.int64)
    rbits = np.zeros(_A_MAIN, np.int64)
    level = np.zeros(_A_MAIN, np.int64)
    base, bits = _buckets()  # _NRUN run buckets, the same as the excess buckets
    for sym in range(1, 1 + _NRUN * ncv):
        rs, cs = (sym - 1) // ncv, (sym - 1) % ncv
        level[sym] = cs + 1
        rbase[sym], rbits[sym] = base[rs], bits[rs]
    return rbase, rbits, level


# ---------------------------------------------------------------------------- encoder
@njit(cache=True, inline="always")
def _left_ctx(codes, at, left):
    """The joint symbol's left level (format 2): 0 without a left column, 1 for a zero code, 2 for a
    non-zero one (format 1 used the code's level: a comparison instead of a lookup on the decoder's
    dependency chain decodes ~20% faster for 1.4% more bytes on real maps)."""
    return 1 + (codes[at] != 0) if left else 0


@njit(nogil=True, cache=True)
def _events(codes, lengths, has_left, tab, sym, raw, rnb, counts):
    """Pass 1: the symbol events in decoding order (table, symbol, raw value, raw bits) and the counts;
    returns (events, escaped codes)."""
    ne, escaped, base = 0, 0, 0
    for j in range(lengths.size):
        length = lengths[j]
        left = has_left and j > 0
        k, up = 0, 0
        while k < length:
            r = 0
            while k + r < length and codes[base + k + r] == 0:
                r += 1
            ctx = _left_ctx(codes, base + k - length, left) * _NUP + _up_level(up)
            tab[ne] = ctx
            raw[ne], rnb[ne] = 0, 0
            if k + r == length:
                sym[ne] = 0
                counts[ctx, 0] += 1
                ne += 1
                break
            rs, nb, extra = _bucket(r, 8)
            raw[ne], rnb[ne] = extra, nb
            k += r
            x = np.int64(codes[base + k])
            s = 1 + rs * _NCV + min(x, _NCV) - 1
            sym[ne] = s
            counts[ctx, s] += 1
            ne += 1
            if x >= _NCV:
                lv = min(np.int64(codes[base + k - length]), ESCAPE) if left else 0
                ctx = N_MAIN + _vlevel(up) * _NV + _vlevel(lv)
                s, nb, extra = _bucket(x - _NCV, 8)
                tab[ne], sym[ne], raw[ne], rnb[ne] = ctx, s, extra, nb
                counts[ctx, s] += 1
                ne += 1
            escaped += x >= ESCAPE
            up = x
            k += 1
        base += length
    return ne, escaped


@njit(cache=True)
def _spread(freq_row, spread):
    """zstd's symbol spread: each symbol's slots scattered over the table by a fixed odd step."""
    step = (_L >> 1) + (_L >> 3) + 3
    pos = 0
    for a in range(freq_row.size):
        for _ in range(freq_row[a]):
            spread[pos] = a
            pos = (pos + step) & (_L - 1)


@njit(nogil=True, cache=True)
def _build(freq, enc, cum):
    """The encoding tables of every used table: the state of each (symbol, sub-state), the symbol's
    first sub-state (``cum``)."""
    spread = np.empty(_L, np.int64)
    nxt = np.empty(freq.shape[1], np.int64)
    for c in range(freq.shape[0]):
        if freq[c].sum() == 0:
            continue
        _spread(freq[c], spread)
        total = 0
        for a in range(freq.shape[1]):
            cum[c, a] = total
            nxt[a] = freq[c, a]
            total += freq[c, a]
        for i in range(_L):
            a = spread[i]
            ns = nxt[a]
            nxt[a] += 1
            enc[c, cum[c, a] + ns - freq[c, a]] = _L + i


@njit(nogil=True, cache=True)
def _code(tab, sym, raw, rnb, ne, freq, enc, cum, words):
    """tANS over the events in reverse (state bits per event), then every event's state bits and raw
    bits written forward; returns (bits written, final state)."""
    sval = np.empty(ne, np.uint16)
    snb = np.empty(ne, np.uint8)
    most = np.zeros(freq.shape, np.int64)  # state bits out: `most`, or one fewer below f << most
    for c in range(freq.shape[0]):
        for a in range(freq.shape[1]):
            if freq[c, a]:
                most[c, a] = _LOG + 1 - _bitlen(freq[c, a])
    x = np.int64(_L)
    for e in range(ne - 1, -1, -1):
        c, a = np.int64(tab[e]), np.int64(sym[e])
        f = freq[c, a]
        nb = most[c, a]
        nb -= x < (f << nb)
        sval[e] = x & ((np.int64(1) << nb) - 1)
        snb[e] = nb
        x = np.int64(enc[c, cum[c, a] + (x >> nb) - f])
    pos = np.int64(0)
    for e in range(ne):
        nb = np.int64(snb[e])
        pos = _put(words, pos, np.int64(sval[e]) | (np.int64(raw[e]) << nb), nb + np.int64(rnb[e]))
    return pos, x


@njit(cache=True, inline="always")
def _put(words, pos, value, nb):
    if nb == 0:
        return pos
    q, sh = pos >> 6, pos & 63
    v = np.uint64(value)
    words[q] |= v << np.uint64(sh)
    if sh + nb > 64:
        words[q + 1] |= v >> np.uint64(64 - sh)
    return pos + nb


@njit(nogil=True, cache=True)
def _tables(freq, out):
    """Per table: used symbols, then (gap to the previous used symbol, frequency - 1) each, LEB128."""
    pos = 0
    for c in range(freq.shape[0]):
        used = 0
        for a in range(freq.shape[1]):
            used += freq[c, a] > 0
        pos = _leb(out, pos, used)
        last = -1
        for a in range(freq.shape[1]):
            if freq[c, a]:
                pos = _leb(out, pos, a - last - 1)
                pos = _leb(out, pos, freq[c, a] - 1)
                last = a
    return pos


@njit(cache=True, inline="always")
def _leb(out, pos, value):
    while value >= 128:
        out[pos] = (value & 127) | 128
        value >>= 7
        pos += 1
    out[pos] = value
    return pos + 1


def encode(codes: np.ndarray, lengths: np.ndarray, *, has_left: bool) -> bytes:
    """The stream of one block's codes (flat, column order: column j is the next ``lengths[j]`` codes,
    bottom-aligned; ``has_left``: column j-1 is the left neighbour of column j)."""
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    if lengths.size and lengths.max() >= 1 << 24:  # keeps every table's symbols (<= 1 + 50 x 16) below L
        raise ValueError(f"tans codes columns of up to 2^24 entries, got one of {int(lengths.max())}")
    n = int(lengths.sum())
    size = 2 * n + lengths.size
    tab, sym = np.empty(size, np.int16), np.empty(size, np.int16)  # 9 bytes per event: few fresh pages
    raw, rnb = np.empty(size, np.uint32), np.empty(size, np.uint8)
    counts = np.zeros((N_TABLES, _A), np.int64)
    ne, escaped = _events(np.ascontiguousarray(codes), lengths, has_left, tab, sym, raw, rnb, counts)
    freq = np.zeros((N_TABLES, _A), np.int64)
    normalise(counts, freq, _L)
    enc = np.zeros((N_TABLES, _L), np.uint16)
    cum = np.zeros((N_TABLES, _A), np.int64)
    _build(freq, enc, cum)
    words = np.zeros(int(ne) * 40 // 64 + 2, np.uint64)  # <= 10 state + 29 raw bits per event
    nbits, state = _code(tab, sym, raw, rnb, ne, freq, enc, cum, words)
    table = np.empty(N_TABLES * (2 * _A + 1) * 3, np.uint8)
    nt = _tables(freq, table)
    n_words = (int(nbits) + 63) // 64
    return (_HEAD.pack(nt, int(nbits), ne, escaped, (int(state) - _L) | _V2) + table[:nt].tobytes()
            + words[:n_words].astype("<u8").tobytes())


# ---------------------------------------------------------------------------- decoder
@njit(nogil=True, cache=True)
def _read_tables(data, freq, ncv):
    """Parse the tables of a stream with ``ncv`` code levels into ``freq``; returns bytes used, or -1 if
    they are malformed."""
    pos = 0
    for c in range(freq.shape[0]):
        used, pos = _uleb(data, pos)
        if used < 0 or used > freq.shape[1]:
            return -1
        a, total = -1, 0
        for _ in range(used):
            gap, pos = _uleb(data, pos)
            f, pos = _uleb(data, pos)
            if gap < 0 or f < 0:
                return -1
            a += gap + 1
            if a > _NRUN * ncv or (c >= N_MAIN and a >= _A_BIG):
                return -1
            freq[c, a] = f + 1
            total += f + 1
        if used and total != _L:
            return -1
    return pos


@njit(cache=True, inline="always")
def _uleb(data, pos):
    value, shift = np.int64(0), 0
    while True:
        if pos >= data.size or shift > 28:
            return np.int64(-1), pos
        b = data[pos]
        pos += 1
        value |= np.int64(b & 127) << shift
        shift += 7
        if b < 128:
            return value, pos


_POISON = 1 << 31  # the entry of every state of an unused table: an EOC that fails the final check


@njit(nogil=True, cache=True)
def _decoding_tables(freq, ncv):
    """The decoder's tables, flat (table c at c * L): per state one uint64 holding its state bits,
    next-state base (<< 4), raw bits (<< 14), for joint symbols the code level (<< 19, 0: EOC) and the
    run bucket's base (<< 32), for excess symbols the bucket's base (<< 32): no second lookup on the
    decoder's dependency chain. Unused tables hold ``_POISON``."""
    rb0, rbits, level = _main_symbols(ncv)
    bb0, bbits = _buckets()
    main = (rbits << 14) | (level << 19) | (rb0 << 32)  # per symbol: the entry's symbol part
    big = (bbits << 14) | (bb0 << 32)
    dtab = np.full(freq.shape[0] * _L, _POISON, np.uint64)
    spread = np.empty(_L, np.int64)
    nxt = np.empty(freq.shape[1], np.int64)
    bits_in = np.empty(2 * _L, np.int64)  # state bits to read at sub-state ns in [f, 2f): no log loop
    for ns in range(1, 2 * _L):
        bits_in[ns] = _LOG - _log2(ns)
    for c in range(freq.shape[0]):
        if freq[c].sum() == 0:
            continue
        _spread(freq[c], spread)
        for a in range(freq.shape[1]):
            nxt[a] = freq[c, a]
        part = main if c < N_MAIN else big
        for i in range(_L):
            a = spread[i]
            ns = nxt[a]
            nxt[a] += 1
            nb = bits_in[ns]
            dtab[c * _L + i] = nb | (((ns << nb) - _L) << 4) | part[a]
    return dtab


@njit(cache=True)
def _luts():
    """Context table offsets (state index of the table's first state) as lookups by code capped at 255:
    of the joint symbol's left level and code above, of the excess symbol's code above and code left."""
    lt, ul, ve, vle = (np.empty(256, np.int64), np.empty(256, np.int64), np.empty(256, np.int64),
                       np.empty(256, np.int64))
    for v in range(256):
        lt[v] = (1 + _vlevel(v)) * _NUP * _L
        ul[v] = _up_level(v) * _L
        ve[v] = (N_MAIN + _vlevel(v) * _NV) * _L
        vle[v] = _vlevel(v) * _L
    return lt, ul, ve, vle


_U = np.uint64  # array indices: unsigned, so that numba adds no negative-index wraparound (12% of decode)


@njit(cache=True, inline="always")
def _bits(words, pos, nb):
    """nb (< 64) bits at bit position pos, LSB first (two aligned loads)."""
    q, sh = _U(pos >> 6), _U(pos & 63)
    v = (words[q] >> sh) | ((words[q + _U(1)] << _U(1)) << (_U(63) - sh))
    return np.int64(v & ((_U(1) << _U(nb)) - _U(1)))


@njit(cache=True, inline="always")
def _step(dtab, index, words, pos):
    """One symbol: the table entry at ``index`` (context offset + state), its payload bits read at ``pos``;
    returns (entry, bits read, state bits, next pos, next state)."""
    entry = np.int64(dtab[_U(index)])
    nb, rb = entry & 0xF, (entry >> 14) & 0x1F
    v = _bits(words, pos, nb + rb)
    return entry, v, nb, pos + nb + rb, ((entry >> 4) & (_L - 1)) + (v & ((np.int64(1) << nb) - 1))


@njit(cache=True, inline="always")
def _decode_loop(dtab, words, nbits, ne, state, lengths, has_left, out, escapes, ncv, v2):
    """Fill the non-zero codes of ``out`` (uint8, zero-filled) and ``escapes`` from a stream with ``ncv``
    code levels (``v2``: format 2's left context, else format 1's); returns 0, or -1 if the stream is
    inconsistent (a run past its column, an unused table, bits or events left over). ``words`` is padded
    so that a column's events can read past ``nbits`` (checked once per column). Inlined into one decoder
    per format, so that ``ncv`` and ``v2`` are constants there."""
    lt, ul, ve, vle = _luts()
    x = np.int64(state)
    pos, bad = np.int64(0), np.int64(0)
    n_esc, base, e = 0, 0, 0
    zeros = np.zeros(lengths.max() if lengths.size else 0, np.uint8)  # the left column of a first column
    row = np.int64(_NUP * _L)  # table offset of one left level
    for j in range(lengths.size):
        length = lengths[j]
        if has_left and j > 0:  # format 2: row 1 (zero) or 2; format 1: lt, the left code's level + 1
            src, at, lbase = out, base - length, row if v2 else np.int64(0)
        else:  # no left column: the "none" level (0), not that of a zero code
            src, at, lbase = zeros, 0, np.int64(0) if v2 else -lt[0]
        k, up = 0, np.int64(0)
        if pos > nbits:
            return -1
        while k < length:
            left = src[_U(at + k)]
            left_offset = (row if left else np.int64(0)) if v2 else lt[_U(left)]
            entry, v, nb, pos, x = _step(dtab, lbase + left_offset + ul[_U(up)] + x, words, pos)
            e += 1
            bad |= entry
            c = (entry >> 19) & 31
            if c == 0:
                break
            k += (entry >> 32) + (v >> nb)
            if k >= length:
                return -1
            if c == ncv:
                entry, v, nb, pos, x = _step(dtab, ve[_U(up)] + vle[_U(src[_U(at + k)])] + x, words, pos)
                e += 1
                bad |= entry
                c = ncv + (entry >> 32) + (v >> nb)
                if c >= ESCAPE:
                    if n_esc >= escapes.size:
                        return -1
                    escapes[n_esc] = c
                    n_esc += 1
                    c = ESCAPE
            out[_U(base + k)] = c
            up = c
            k += 1
        base += length
    ok = n_esc == escapes.size and x == 0 and e == ne and pos == nbits and not bad & _POISON
    return 0 if ok else -1


@njit(nogil=True, cache=True)
def _decode_v2(dtab, words, nbits, ne, state, lengths, has_left, out, escapes):
    return _decode_loop(dtab, words, nbits, ne, state, lengths, has_left, out, escapes, _NCV, True)


@njit(nogil=True, cache=True)
def _decode_v1(dtab, words, nbits, ne, state, lengths, has_left, out, escapes):
    return _decode_loop(dtab, words, nbits, ne, state, lengths, has_left, out, escapes, _NCV_V1, False)


def decode(stream, lengths: np.ndarray, *, has_left: bool, out: np.ndarray) -> np.ndarray:
    """Fill ``out`` (uint8, ZERO-FILLED, the block's codes in column order) from one stream of ``encode``
    (either format); returns the escaped codes (int32, in order: their bytes in ``out`` hold ``ESCAPE``)."""
    data = np.frombuffer(stream, dtype=np.uint8)
    damaged = ValueError(f"tans stream of {data.size} bytes is damaged or truncated (it does not decode to the "
                         f"block's {out.size} codes)")
    if data.size < _HEAD.size:
        raise ValueError(f"tans stream of {data.size} bytes is shorter than its header")
    n_table, nbits, ne, n_esc, state = _HEAD.unpack_from(data)
    ncv, state = (_NCV, state - _V2) if state & _V2 else (_NCV_V1, state)
    n_words = (nbits + 63) // 64
    if _HEAD.size + n_table + 8 * n_words != data.size or state >= _L:
        raise damaged
    freq = np.zeros((N_TABLES, _A), np.int64)
    if _read_tables(data[_HEAD.size:_HEAD.size + n_table], freq, ncv) != n_table:
        raise damaged
    dtab = _decoding_tables(freq, ncv)
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    longest = int(lengths.max()) if lengths.size else 0
    # padded so that a column's events (<= 78 bits per code) stay inside: bounds checked once per column
    words = np.zeros(n_words + 2 + (longest + 1) * 80 // 64, np.uint64)
    words[:n_words] = np.frombuffer(data[_HEAD.size + n_table:], dtype="<u8")
    escapes = np.zeros(n_esc, np.int32)
    if (_decode_v2 if ncv == _NCV else _decode_v1)(dtab, words, nbits, ne, state, lengths, has_left, out, escapes):
        raise damaged
    return escapes
