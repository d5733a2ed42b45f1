"""rans: interleaved range-ANS coding of a section's bytes with static tables chosen per part (docs/FORMAT.md, "rans").

Why: quantized codes are near-i.i.d. within a tensor but not across tensors, and a tensor's columns (input features)
have different spreads. A byte compressor sees neither the tensor boundaries nor the shape; this coder gets both
from the section layout and chooses, per part, one table, or one table per class of rows or columns, whichever
costs the fewest bytes including the tables and class indices.

Decoding is vectorised over `lanes` interleaved states, so numpy alone decodes tens of millions of symbols a second;
the emitted tiny decoder runs the same loop (DECODER_DEF at the end of this file, which squeeze/decoder.py pastes
in). Encoding runs the same loop backwards.
"""
import dataclasses
import zlib
from dataclasses import dataclass

import numpy as np

from ..errors import FormatError

ID, NAME = 5, "rans"
USES_LAYOUT = True
DECODE_ERRORS = ()  # decode raises FormatError itself for every broken rule
DECODER_IMPORT = ""
DECODER_EXPR = "R"  # DECODER_DEF's function, defined before the codec table

PROB_BITS = 12          # M = 4096: tables are small (a decoder builds 3·M entries per table), coding loss < 0.1%
STATE_LOW = 1 << 16     # states live in [2^16, 2^32); one 16-bit word is moved per renormalisation
MAX_LANES = 4096
MIN_STEPS = 4096        # fewer lanes for small sections: each lane's final state costs ~3 bytes (0.2% at 3 bits/sym)
MAX_TABLES = 4096
MAX_CLASSES = 64
CLASS_CHOICES = (2, 4, 8, 16)
MIN_CLASS_SYMBOLS = 4096  # parts smaller than this are not worth class tables


# ---------------------------------------------------------------------------------------------------------------
# Tables

def quantize_counts(counts: np.ndarray, prob_bits: int = PROB_BITS) -> np.ndarray:
    """Frequencies summing to 2^prob_bits, nonzero exactly where counts are (all on symbol 0 when there are no
    counts); close to counts in proportion.

    Deterministic: integer arithmetic after one float64 scaling, ties broken by symbol order.
    """
    counts = np.asarray(counts, dtype=np.int64)
    total, m = int(counts.sum()), 1 << prob_bits
    f = np.zeros(counts.size, dtype=np.int64)
    if total == 0:  # a table nothing uses (an empty part) must still be valid
        f[0] = m
        return f
    present = counts > 0
    f[present] = np.maximum(1, np.floor(counts[present] * (m / total)).astype(np.int64))
    # Hand out (or take back) the remainder where it costs least: most counts per unit of frequency change.
    diff = m - int(f.sum())
    while diff != 0:
        if diff > 0:
            gain = np.where(present, counts / (f + 1.0), -1.0)  # bits saved ≈ c·log(1+1/f)
            j = int(np.argmax(gain))
            step = min(diff, max(1, int(f[j] * 0.01)))
            f[j] += step
            diff -= step
        else:
            loss = np.full(f.size, np.inf)
            np.divide(counts, f - 1.0, out=loss, where=f > 1)
            j = int(np.argmin(loss))
            step = min(-diff, max(1, int((f[j] - 1) * 0.01)), int(f[j] - 1))
            f[j] -= step
            diff += step
    return f


def symbol_counts(sym: np.ndarray) -> np.ndarray:
    """np.bincount(sym, minlength=256) of uint8 symbols, a million at a time (bincount widens its input to int64: 8
    bytes per symbol of a whole section otherwise)."""
    sym = sym.reshape(-1)
    counts = np.zeros(256, dtype=np.int64)
    for a in range(0, sym.size, 1 << 20):
        counts += np.bincount(sym[a:a + (1 << 20)], minlength=256)
    return counts


def code_bits(counts: np.ndarray, freqs: np.ndarray, prob_bits: int = PROB_BITS) -> float:
    """Bits to code symbols with these counts under these frequencies (the coder's cost within a few bits)."""
    used = counts > 0
    return float((counts[used] * (prob_bits - np.log2(freqs[used]))).sum())


def entropy_bits(counts: np.ndarray) -> float:
    """Order-0 empirical entropy of the symbols, in bits (what inspect reports beside the coded size)."""
    c = np.asarray(counts, dtype=np.float64)
    c = c[c > 0]
    return float(-(c * np.log2(c / c.sum())).sum()) if c.size else 0.0


def _table_values(freqs: np.ndarray) -> list:
    nz = np.flatnonzero(freqs)
    lo, hi = (int(nz[0]), int(nz[-1]) + 1) if nz.size else (0, 0)
    return [lo, hi - lo, *freqs[lo:hi].tolist()]


def _table_cost_bits(freqs: np.ndarray) -> float:
    """Estimated stored cost of a table: its u16 values after zlib (about 1.25 bytes each on real tables)."""
    nz = np.flatnonzero(freqs)
    return 8 * 1.25 * (2 + (nz[-1] - nz[0] + 1 if nz.size else 0))


# ---------------------------------------------------------------------------------------------------------------
# Choosing a model per part

def _classes(spread: np.ndarray, k: int) -> np.ndarray:
    """k classes of rows/columns by quantiles of their spread (mean |symbol − centre|)."""
    edges = np.quantile(spread, np.linspace(0, 1, k + 1)[1:-1])
    return np.searchsorted(edges, spread, side="right").astype(np.int64)


def _class_tables(sym2d: np.ndarray, cls: np.ndarray, mode: int, k: int) -> tuple[float, list]:
    """(estimated bits, tables) of coding sym2d with one table per class of its rows (`cls` per row, modes 1 and 3)
    or columns (per column, mode 2)."""
    rows, cols = sym2d.shape
    pos_cls = np.repeat(cls << 8, cols) if mode != 2 else np.tile(cls << 8, rows)
    pos_cls += sym2d.ravel()
    class_counts = np.bincount(pos_cls, minlength=k * 256).reshape(k, 256)
    del pos_cls
    bits, tables = 0.0, []
    for c in class_counts:
        f = quantize_counts(c)
        bits += code_bits(c, f) + _table_cost_bits(f)
        tables.append(f)
    return bits, tables


def row_references(sym2d: np.ndarray) -> np.ndarray:
    """For each row, how far back its most similar earlier row is (0: none worth using).

    Rows of an embedding whose tokens are rare stay near their shared initial drift and nearly repeat each other; a
    row coded as its difference to such a neighbour costs a fraction of its order-0 entropy. A sample decides first
    whether the search over all pairs is worth its time.
    """
    rows, cols = sym2d.shape
    back = np.zeros(rows, dtype=np.int64)
    if rows < 16:
        return back
    # Integer-valued float64: every product and sum below is an exact integer (< 2^53), so the search gives the same
    # answer whatever BLAS and thread count computed it, and compile stays deterministic.
    f = sym2d.astype(np.float64) - np.round(sym2d.mean())
    norm = (f * f).sum(axis=1)
    own = norm  # squared distance to the mean value: the cost proxy of coding a row plainly

    def nearest_earlier(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = norm[idx, None] + norm[None, :] - 2 * (f[idx] @ f.T)
        d[np.arange(rows)[None, :] >= idx[:, None]] = np.inf  # only earlier rows
        j = d.argmin(axis=1)
        return j, d[np.arange(len(idx)), j]

    sample = np.linspace(1, rows - 1, min(rows - 1, 128)).astype(np.int64)
    _, dist = nearest_earlier(sample)
    if np.count_nonzero(dist < 0.25 * own[sample]) < 0.02 * sample.size:
        return back
    for a in range(1, rows, 1024):
        idx = np.arange(a, min(rows, a + 1024))
        j, dist = nearest_earlier(idx)
        use = dist < 0.25 * own[idx]
        back[idx[use]] = idx[use] - j[use]
    return back


def _part_options(sym2d: np.ndarray, shared: np.ndarray):
    """Yield (bits, model values after the table list, [freqs per class], class of each row (modes 1, 3) or column
    (mode 2), symbols as coded) for each way to code one part. Table indices in the values are relative to the part's
    tables."""
    counts = symbol_counts(sym2d)
    yield code_bits(counts, shared), None, None, None, sym2d  # the section's shared table (its cost is paid once)
    own = quantize_counts(counts)
    yield code_bits(counts, own) + _table_cost_bits(own), [0], [own], None, sym2d
    rows, cols = sym2d.shape
    if sym2d.size < MIN_CLASS_SYMBOLS:
        return
    centre = float((np.arange(256) * counts).sum() / max(1, counts.sum()))
    dev = np.abs(np.arange(256) - centre)[sym2d]
    spread_of = {1: dev.mean(axis=1), 2: dev.mean(axis=0)}
    del dev
    for mode, axis_len in ((1, rows), (2, cols)):
        for k in CLASS_CHOICES:
            if axis_len < 4 * k:
                continue
            cls = _classes(spread_of[mode], k)
            bits, tables = _class_tables(sym2d, cls, mode, k)
            yield bits + 8 * 0.6 * axis_len, [mode, k, *range(k), *cls.tolist()], tables, cls, sym2d
    back = row_references(sym2d)
    if back.any():  # mode 3: referencing rows are coded as differences, with a class (table) of their own
        coded = sym2d.copy()
        ref = np.flatnonzero(back)
        coded[ref] = sym2d[ref] - sym2d[ref - back[ref]]  # uint8: mod 256
        plain = back == 0
        for k in (1, 2, 4, 8):
            if np.count_nonzero(plain) < 4 * k:
                continue
            cls = np.full(rows, k, dtype=np.int64)
            cls[plain] = _classes(spread_of[1][plain], k)
            bits, tables = _class_tables(coded, cls, 3, k + 1)
            side = 8 * (0.6 * rows + 1.5 * ref.size)  # classes, and back distances (zeros compress away)
            yield bits + side, [3, k + 1, *range(k + 1), *cls.tolist(), *back.tolist()], tables, cls, coded


@dataclass
class _Part:
    """Where one part's symbols take their tables from: `table` (mode 0), or `ids`, the table index of each row
    (modes 1, 3) or column (mode 2); `coded`: its symbols as coded when they are not the section's (mode 3)."""
    start: int
    rows: int
    cols: int
    mode: int
    table: int = 0
    ids: np.ndarray | None = None
    coded: np.ndarray | None = None


class _Contexts:
    """The table index (and coded symbol) of every position of a section, made a block at a time (BLOCK positions)
    from its parts: a whole section's worth would cost bytes per symbol, a block costs a few megabytes."""

    def __init__(self, parts: list, n: int, sym: np.ndarray | None = None):
        self.parts = [p for p in parts if p.rows * p.cols]
        self.starts = np.array([p.start for p in self.parts], dtype=np.int64)
        self.n, self.sym = n, sym

    def remapped(self, table_of: np.ndarray) -> "_Contexts":
        """The same contexts with every table index t replaced by table_of[t]."""
        parts = [dataclasses.replace(p, table=int(table_of[p.table]) if p.mode == 0 else 0,
                                     ids=None if p.ids is None else table_of[p.ids]) for p in self.parts]
        return _Contexts(parts, self.n, self.sym)

    def block(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(table index u16[b − a], symbols as coded u8[b − a] or None without `sym`) of positions a..b."""
        ctx = np.empty(b - a, dtype=np.uint16)
        sym = None if self.sym is None else self.sym[a:b]
        copied = False
        i = max(0, int(np.searchsorted(self.starts, a, side="right")) - 1)
        while i < len(self.parts) and self.parts[i].start < b:
            p = self.parts[i]
            i += 1
            s, e = max(a, p.start) - p.start, min(b, p.start + p.rows * p.cols) - p.start  # within the part
            if e <= s:
                continue
            out = ctx[p.start + s - a: p.start + e - a]
            if p.mode == 0:
                out[:] = p.table
            else:
                r0, r1 = s // p.cols, (e - 1) // p.cols + 1
                per = np.repeat(p.ids[r0:r1], p.cols) if p.mode != 2 else np.tile(p.ids, r1 - r0)
                out[:] = per[s - r0 * p.cols: e - r0 * p.cols]
            if p.coded is not None and sym is not None:
                if not copied:
                    sym, copied = sym.copy(), True
                sym[p.start + s - a: p.start + e - a] = p.coded.ravel()[s:e]
        return ctx, sym


def _choose(sym: np.ndarray, layout) -> tuple[list, list, list]:
    """(tables, model values after the tables, [_Part] in layout order), minimising the estimated bytes of each
    part."""
    shared = quantize_counts(symbol_counts(sym))
    shared_index = None
    tables, values, parts, pos = [], [], [], 0
    for rows, cols in layout:
        part = sym[pos: pos + rows * cols].reshape(rows, cols)
        start, pos = pos, pos + rows * cols
        _, part_values, freqs, cls, coded = min(_part_options(part, shared), key=lambda o: o[0])
        coded = coded if coded is not part else None
        if part_values is None:  # the shared table, added the first time a part uses it
            if shared_index is None:
                shared_index = len(tables)
                tables.append(shared)
            values += [0, shared_index]
            parts.append(_Part(start, rows, cols, 0, table=shared_index))
            continue
        first = len(tables)
        tables += freqs
        if part_values[0] == 0:
            values += [0, first]
            parts.append(_Part(start, rows, cols, 0, table=first))
        else:
            k = part_values[1]
            values += part_values[:2] + [first + t for t in part_values[2:2 + k]] + part_values[2 + k:]
            parts.append(_Part(start, rows, cols, part_values[0], ids=(first + cls).astype(np.uint16), coded=coded))
    return tables, values, parts


def choose_model(sym: np.ndarray, layout) -> tuple[list, list, np.ndarray, np.ndarray]:
    """(tables, model values after the tables, table index per symbol position, symbols as coded), minimising the
    estimated bytes of each part. (The encoder itself never holds the per-position arrays: see _Contexts.)"""
    tables, values, parts = _choose(sym, layout)
    ctx, coded = _Contexts(parts, sym.size, sym).block(0, sym.size)
    return tables, values, ctx.astype(np.int64), np.array(coded, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Coding

def lanes_for(n: int) -> int:
    """Lanes for n symbols (docs/FORMAT.md): enough for numpy to work on long vectors, few enough that their final
    states (~3 bytes each) stay below 0.2% of the stream."""
    return 0 if n == 0 else max(1, min(MAX_LANES, n // MIN_STEPS))


def _slot_tables(tables: list, prob_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The decoder's lookup tables, per table and slot, concatenated: the slot's symbol, and its frequency f and
    slot − cum packed as f·2^P + (slot − cum) (one gather per symbol instead of two; both fit: f ≤ 2^P)."""
    m = 1 << prob_bits
    if not tables:  # a stream of no symbols (an empty layout) may name no table
        return np.zeros(0, np.uint8), np.zeros(0, np.uint32)
    sym, packed = [], []
    slots = np.arange(m, dtype=np.uint32)
    for f in tables:
        f = np.asarray(f, dtype=np.uint32)
        cum = np.cumsum(f, dtype=np.uint32) - f
        s = np.repeat(np.arange(f.size, dtype=np.uint8), f)
        sym.append(s)
        packed.append((f[s] << prob_bits) | (slots - cum[s]))
    return np.concatenate(sym), np.concatenate(packed)


BLOCK = 1 << 18  # positions whose tables, frequencies and slots are made at once (a multiple of any lane count)


def _coding_tables(tables: list) -> tuple[np.ndarray, np.ndarray]:
    """Frequency and cumulative frequency of every (table, symbol), flat: index table·256 + symbol (u32)."""
    full = np.stack([np.asarray(f, dtype=np.int64) for f in tables]) if tables else np.zeros((0, 256), np.int64)
    cum = np.concatenate([np.zeros((full.shape[0], 1), np.int64), np.cumsum(full, axis=1)[:, :-1]], axis=1)
    return full.ravel().astype(np.uint32), cum.ravel().astype(np.uint32)


def _encode_blocks(n: int, contexts, tables: list, lanes: int, prob_bits: int = PROB_BITS):
    """(final states u32[lanes], words as u16 chunks in stream order) of n symbols, `contexts.block(a, b)` giving
    the table indices and symbols of positions a..b. Blocks are coded last to first (rANS runs backwards), each
    made when it is reached, so memory is a few bytes per block position, not per symbol."""
    f_flat, c_flat = _coding_tables(tables)
    x = np.full(lanes, STATE_LOW, dtype=np.uint64)
    chunks = []
    shift, p, low16 = np.uint64(32 - prob_bits), np.uint64(prob_bits), np.uint64(0xFFFF)
    step = max(lanes, 1)
    span = step * max(1, BLOCK // step)  # blocks start where steps do: at multiples of the lane count
    for b0 in reversed(range(0, n, span)):
        b1 = min(n, b0 + span)
        ctx, sym = contexts.block(b0, b1)
        key = (ctx.astype(np.int64) << 8) | sym
        f_blk = f_flat[key]
        if f_blk.min() == 0:
            raise ValueError("rans: a symbol has zero frequency in its table")
        c_blk = c_flat[key].astype(np.uint64)
        del key, ctx, sym
        f_blk = f_blk.astype(np.uint64)
        lim_blk = f_blk << shift
        for a in reversed(range(b0, b1, step)):
            w, i = min(lanes, n - a), a - b0
            y, f = x[:w], f_blk[i:i + w]
            emit = y >= lim_blk[i:i + w]
            chunks.append((y[emit] & low16).astype("<u2"))
            np.right_shift(y, np.uint64(16), out=y, where=emit)
            q, r = np.divmod(y, f)
            np.left_shift(q, p, out=q)
            q += r
            q += c_blk[i:i + w]
            x[:w] = q
    return x.astype(np.uint32), chunks[::-1]


class _Arrays:
    """Contexts (and symbols) given as whole arrays."""

    def __init__(self, ctx: np.ndarray, sym: np.ndarray | None = None):
        self.ctx, self.sym, self.n = ctx, sym, ctx.size

    def block(self, a: int, b: int):
        return self.ctx[a:b], None if self.sym is None else self.sym[a:b]


def encode_symbols(sym: np.ndarray, ctx: np.ndarray, tables: list, lanes: int, prob_bits: int = PROB_BITS):
    """(final states u32[lanes], words u16[]) for symbols `sym` whose table indices are `ctx`."""
    states, chunks = _encode_blocks(sym.size, _Arrays(np.asarray(ctx), np.asarray(sym, dtype=np.uint8)), tables,
                                    lanes, prob_bits)
    return states, np.concatenate(chunks) if chunks else np.zeros(0, np.uint16)


def decode_symbols(states: np.ndarray, words: np.ndarray, ctx, tables: list, prob_bits: int,
                   what: str = "rans", out: np.ndarray | None = None) -> np.ndarray:
    """Inverse of encode_symbols (`ctx`: the table indices, an array or a _Contexts; `out`: a u8 array to decode
    into); FormatError if the stream is inconsistent (too few words, bad final state).

    Each step decodes one symbol in every lane with a handful of numpy calls on `lanes`-long vectors; the slot
    indices of a block of steps are kept and mapped to symbols at its end (one large gather beats one per step, and
    a block's slots, not the section's, are what memory holds)."""
    contexts = _Arrays(ctx) if isinstance(ctx, np.ndarray) else ctx
    n, lanes = contexts.n, states.size
    slot_sym, slot_packed = _slot_tables(tables, prob_bits)
    mask = np.uint32((1 << prob_bits) - 1)
    shift = np.uint32(prob_bits)
    x = states.astype(np.uint32).copy()
    words = words.astype(np.uint32)  # once, not per renormalisation
    low_bits = np.empty(lanes, dtype=np.uint32)  # scratch: the in-place forms below allocate nothing per step
    out = np.empty(n, dtype=np.uint8) if out is None else out
    p = 0
    step = max(lanes, 1)
    span = step * max(1, BLOCK // step)
    for b0 in range(0, n, span):
        b1 = min(n, b0 + span)
        slots = contexts.block(b0, b1)[0].astype(np.uint32) << shift
        for a in range(b0, b1, step):
            w, i = min(lanes, n - a), a - b0
            xw, idx, scratch = x[:w], slots[i:i + w], low_bits[:w]
            np.bitwise_and(xw, mask, out=scratch)
            idx |= scratch
            packed = slot_packed[idx]
            # x' = f · (x >> P) + (slot − cum), in place
            xw >>= shift
            np.right_shift(packed, shift, out=scratch)
            xw *= scratch
            packed &= mask
            xw += packed
            low = (xw < STATE_LOW).nonzero()[0]  # the lanes that read a word (~a fifth of them)
            k = low.size
            if p + k > words.size:
                raise FormatError(f"{what}: stream ends early")
            xw[low] = (xw[low] << 16) | words[p:p + k]
            p += k
        out[b0:b1] = slot_sym[slots]
    if p != words.size or (lanes and not np.all(x == STATE_LOW)):
        raise FormatError(f"{what}: stream does not end where it should (damaged)")
    return out


# ---------------------------------------------------------------------------------------------------------------
# The codec interface (squeeze/codecs/__init__.py)

def encode(raw_bytes: bytes, params, layout) -> bytes:
    sym = np.frombuffer(raw_bytes, dtype=np.uint8)
    tables, part_values, parts = _choose(sym, layout)
    model = np.array([len(tables)] + [v for f in tables for v in _table_values(f)] + part_values, dtype="<u2")
    model_z = zlib.compress(model.tobytes(), 9)
    lanes = lanes_for(sym.size)
    states, chunks = _encode_blocks(sym.size, _Contexts(parts, sym.size, sym), tables, lanes)
    head = np.array([PROB_BITS, 0], dtype=np.uint8).tobytes() + np.array([lanes], "<u2").tobytes() \
        + np.array([len(model_z)], "<u4").tobytes()
    return b"".join([head, model_z, states.astype("<u4"), *chunks])


def model_bound(layout) -> int:
    """Largest possible decoded model (bytes), from the layout: what a reader lets zlib produce at most."""
    return 2 * (1 + MAX_TABLES * 258 + sum(2 + MAX_CLASSES + max(r, c) for r, c in layout))


class _Cursor:
    def __init__(self, values: np.ndarray, what: str):
        self.v, self.i, self.what = values, 0, what

    def take(self, k: int = 1) -> np.ndarray:
        if self.i + k > self.v.size:
            raise FormatError(f"{self.what}: model is truncated")
        out = self.v[self.i:self.i + k]
        self.i += k
        return out


@dataclass
class Model:
    """A parsed model: tables as 256-entry frequency arrays, where each part's positions take their tables from
    (`contexts`; `ctx` is the table index of every position, made whole on demand), the row references of mode-3
    parts as (part offset, cols, back distances), and a short description of each part's model."""
    tables: list
    contexts: "_Contexts"
    references: list
    part_models: list
    referenced: set         # table indices some part names: only these get decoder lookup tables

    @property
    def ctx(self) -> np.ndarray:
        return self.contexts.block(0, self.contexts.n)[0]


def parse_model(values: np.ndarray, layout, prob_bits: int, what: str) -> Model:
    """The model of a stream, checking every rule of the spec."""
    cur = _Cursor(values.astype(np.int64), what)
    n_tables = int(cur.take()[0])
    if n_tables > MAX_TABLES:
        raise FormatError(f"{what}: {n_tables} tables (at most {MAX_TABLES})")
    tables = []
    for _ in range(n_tables):
        lo, n = (int(v) for v in cur.take(2))
        f = cur.take(n)
        if lo + n > 256 or int(f.sum()) != 1 << prob_bits:
            raise FormatError(f"{what}: invalid frequency table")
        full = np.zeros(256, dtype=np.int64)
        full[lo:lo + n] = f
        tables.append(full)
    parts, references, part_models, referenced, offset = [], [], [], set(), 0
    for rows, cols in layout:
        offset += rows * cols
        mode = int(cur.take()[0])
        if mode == 0:
            t = int(cur.take()[0])
            if t >= n_tables:
                raise FormatError(f"{what}: table index {t} out of range")
            parts.append(_Part(offset - rows * cols, rows, cols, 0, table=t))
            part_models.append(f"table {t}")
            referenced.add(t)
            continue
        if mode not in (1, 2, 3):
            raise FormatError(f"{what}: unknown part mode {mode}")
        k = int(cur.take()[0])
        if not 1 <= k <= MAX_CLASSES:
            raise FormatError(f"{what}: {k} classes (1..{MAX_CLASSES})")
        ids = cur.take(k)
        cls = cur.take(cols if mode == 2 else rows)
        if (ids >= n_tables).any() or (cls >= k).any():
            raise FormatError(f"{what}: class or table index out of range")
        referenced.update(int(t) for t in ids)
        # a table index per row or column, not per position: the reader holds no per-symbol model
        parts.append(_Part(offset - rows * cols, rows, cols, mode, ids=ids.astype(np.uint16)[cls]))
        part_models.append(f"{k} {'column' if mode == 2 else 'row'} classes")
        if mode == 3:
            back = cur.take(rows)
            if (back > np.arange(rows)).any():
                raise FormatError(f"{what}: a row refers to a row before the part")
            references.append((offset - rows * cols, cols, back))
            part_models[-1] = f"{np.count_nonzero(back)} row refs + {k - 1} row classes"
    if cur.i != cur.v.size:
        raise FormatError(f"{what}: model has {cur.v.size - cur.i} values too many")
    return Model(tables, _Contexts(parts, offset), references, part_models, referenced)


def undo_row_references(sym: np.ndarray, references) -> np.ndarray:
    """Rows coded as differences to an earlier row (mode 3) become themselves again, in row order."""
    for offset, cols, back in references:
        for r in np.flatnonzero(back):
            row, ref = offset + r * cols, offset + (r - back[r]) * cols
            sym[row:row + cols] += sym[ref:ref + cols]  # uint8 arithmetic: mod 256
    return sym


@dataclass
class Stream:
    """A checked stream: everything but the decoding of its words. `overhead`: bytes before the words."""
    prob_bits: int
    model: Model
    states: np.ndarray
    words: np.ndarray
    overhead: int


def read_stream(stored: bytes, raw_size: int, layout, what: str = "rans") -> Stream:
    """Check and parse a stream's header, model and lane states (FormatError on any broken rule)."""
    if sum(r * c for r, c in layout) != raw_size:
        raise FormatError("rans: the section layout does not cover the section")
    if len(stored) < 8:
        raise FormatError("rans: stream too short")
    prob_bits, reserved = stored[0], stored[1]
    lanes = int(np.frombuffer(stored, "<u2", 1, 2)[0])
    model_size = int(np.frombuffer(stored, "<u4", 1, 4)[0])
    if not 8 <= prob_bits <= 15 or reserved:
        raise FormatError(f"rans: invalid stream header (prob_bits {prob_bits})")
    if lanes != lanes_for(raw_size):  # the lane count is fixed by the size, which ties the stream to it
        raise FormatError(f"rans: stream holds more or fewer symbols than the declared {raw_size} ({lanes} lanes)")
    body = 8 + model_size
    if body + 4 * lanes > len(stored) or (len(stored) - body - 4 * lanes) % 2:
        raise FormatError("rans: stream is truncated")
    d = zlib.decompressobj()
    try:
        model = d.decompress(stored[8:body], model_bound(layout) + 1)
    except zlib.error as e:
        raise FormatError(f"rans: model is damaged ({e})") from None
    if not d.eof or len(model) % 2 or len(model) > model_bound(layout):
        raise FormatError("rans: model is damaged")
    parsed = parse_model(np.frombuffer(model, "<u2"), layout, prob_bits, what)
    states = np.frombuffer(stored, "<u4", lanes, body)
    if (states < STATE_LOW).any():
        raise FormatError("rans: invalid final state")
    words = np.frombuffer(stored, "<u2", offset=body + 4 * lanes)
    return Stream(prob_bits, parsed, states, words, body + 4 * lanes)


def decode(stored: bytes, raw_size: int, layout) -> bytearray:
    st = read_stream(stored, raw_size, layout)
    tables, contexts = st.model.tables, st.model.contexts
    if len(st.model.referenced) < len(tables):  # tables no part names (never written by squeeze) get no lookups
        used = sorted(st.model.referenced)
        remap = np.zeros(len(tables), dtype=np.uint16)
        remap[used] = np.arange(len(used))
        tables, contexts = [tables[i] for i in used], contexts.remapped(remap)
    # decoded into a bytearray that is returned as it is: a section's worth of bytes, not two (bytes would be a copy)
    out = bytearray(raw_size)
    sym = decode_symbols(st.states, st.words, contexts, tables, st.prob_bits, "rans", np.frombuffer(out, np.uint8))
    undo_row_references(sym, st.model.references)
    del sym
    return out


def stream_costs(stored: bytes, raw: bytes, layout) -> tuple[int, list, list]:
    """Where a rans section's bytes went: (overhead bytes: stream header, model and lane states; the coded bits of
    each part under its tables, in layout order; each part's model described). For inspect.

    Per part: the counts of each (table, coded symbol) times that symbol's cost under the table, so memory is a
    part's worth of counts, never a value per symbol."""
    st = read_stream(stored, len(raw), layout)
    sym = np.frombuffer(raw, dtype=np.uint8)
    cost = st.prob_bits - np.log2(np.maximum(np.stack(st.model.tables), 1)) if st.model.tables else None
    back_of = {offset: back for offset, _, back in st.model.references}
    bits, contexts = [], st.model.contexts
    parts = iter(contexts.parts)
    for rows, cols in layout:
        if rows * cols == 0:
            bits.append(0.0)
            continue
        p = next(parts)
        coded = sym[p.start: p.start + rows * cols]
        if p.start in back_of:  # the coded symbols of a mode-3 part: its differences, undone in reverse order
            back, coded = back_of[p.start], coded.copy()
            for r in np.flatnonzero(back)[::-1]:
                coded[r * cols: (r + 1) * cols] -= coded[(r - back[r]) * cols: (r - back[r] + 1) * cols]
        if p.mode == 0:
            counts = symbol_counts(coded)
            bits.append(float((counts * cost[p.table]).sum()))
            continue
        used = np.unique(p.ids)
        local = np.searchsorted(used, p.ids).astype(np.int64) << 8  # per row (modes 1, 3) or column (mode 2)
        index = np.repeat(local, cols) if p.mode != 2 else np.tile(local, rows)
        counts = np.bincount(index + coded, minlength=used.size * 256).reshape(used.size, 256)
        bits.append(float((counts * cost[used]).sum()))
    return st.overhead, bits, st.model.part_models


# The tiny decoder's part (squeeze/decoder.py): V(header) gives each section's parts as (offset, length, name,
# (rows, cols)) like format.part_matrix; R is decode_symbols + parse_model without the checks the CRC makes moot.
DECODER_DEF = '''\
def V(H):
 Y={}
 for t in H["tensors"]:
  for k in"codes","scales","data","lowrank":
   if k in t:
    r=t[k];s=t["shape"];N=int(np.prod(s));y=s[0]if s[1:]else 1
    Y.setdefault(r[0],[]).append((r[1],r[2],t["name"],(y,N//y if y else 0)if k=="codes"and t["q"]["pack"]=="byte"else(1,r[2])))
 return Y
def R(b,n,l):
 P=b[0];K=int.from_bytes(b[2:4],"little");e=8+int.from_bytes(b[4:8],"little");m=1<<P
 v=np.frombuffer(zlib.decompressobj().decompress(b[8:e],1<<26),"<u2").astype(np.int64);T=[];i=1
 for _ in range(v[0]):a,k=v[i:i+2];f=np.zeros(256,np.int64);f[a:a+k]=v[i+2:i+2+k];i+=2+k;T.append(f)
 Z=[];z=0
 if sum(r*q for r,q in l)!=n:E("bad rans layout")
 c=np.empty(n,np.uint32)
 for r,q in l:
  o=v[i];k=v[i+1];i+=2;U=c[z:z+r*q].reshape(r,q);z+=r*q
  if o==0:U[:]=k;continue
  g=q if o==2 else r;y=v[i:i+k][v[i+k:i+k+g]];i+=k+g;U[:]=y if o==2 else y[:,None]
  if o==3:Z.append((z-r*q,q,v[i:i+r]));i+=r
 c<<=P;Q=[(f,np.repeat(np.arange(256),f))for f in T]
 s=np.concatenate([q for f,q in Q]).astype(np.uint8)
 F=np.concatenate([f[q]<<P|np.arange(m)-(np.cumsum(f)-f)[q]for f,q in Q]).astype(np.uint32)
 x=np.frombuffer(b,"<u4",K,e).copy();w=np.frombuffer(b,"<u2",offset=e+4*K).astype(np.uint32);p=0
 for a in range(0,n,K or 1):
  h=min(K,n-a);X=x[:h];j=c[a:a+h];j|=X&m-1;g=F[j];X>>=P;X*=g>>P;X+=g&m-1;t=(X<65536).nonzero()[0];k=t.size
  X[t]=X[t]<<16|w[p:p+k];p+=k
 if p!=w.size or(x!=65536).any():E("bad rans stream")
 u=s[c]
 for a,q,d in Z:
  for r in np.flatnonzero(d):u[a+r*q:a+r*q+q]+=u[a+(r-d[r])*q:a+(r-d[r])*q+q]
 return u.tobytes()
'''
