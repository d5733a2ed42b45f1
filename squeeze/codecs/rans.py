"""rans: interleaved range-ANS coding of a section's bytes with static tables chosen per part (docs/FORMAT.md, "rans").

Why: quantized codes are near-i.i.d. within a tensor but not across tensors, and a tensor's columns (input features)
have different spreads. A byte compressor sees neither the tensor boundaries nor the shape; this coder gets both
from the section layout and chooses, per part, one table, or one table per class of rows or columns, whichever
costs the fewest bytes including the tables and class indices.

Decoding is vectorised over `lanes` interleaved states, so numpy alone decodes tens of millions of symbols a second;
the emitted tiny decoder runs the same loop (DECODER_DEF at the end of this file, which squeeze/decoder.py pastes
in). Encoding runs the same loop backwards.
"""
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


def _class_tables(sym2d: np.ndarray, pos_cls: np.ndarray, k: int) -> tuple[float, list]:
    """(estimated bits, tables) of coding sym2d with one table per class of positions."""
    class_counts = np.bincount(pos_cls * 256 + sym2d.ravel(), minlength=k * 256).reshape(k, 256)
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
    """Yield (bits, model values after the table list, [freqs per class], table index per class position,
    symbols as coded) for each way to code one part. Table indices in the values are relative to the part's tables."""
    counts = np.bincount(sym2d.ravel(), minlength=256)
    yield code_bits(counts, shared), None, None, None, sym2d  # the section's shared table (its cost is paid once)
    own = quantize_counts(counts)
    yield code_bits(counts, own) + _table_cost_bits(own), [0], [own], None, sym2d
    rows, cols = sym2d.shape
    if sym2d.size < MIN_CLASS_SYMBOLS:
        return
    centre = float((np.arange(256) * counts).sum() / max(1, counts.sum()))
    dev_of_symbol = np.abs(np.arange(256) - centre)
    spread_of = {1: dev_of_symbol[sym2d].mean(axis=1), 2: dev_of_symbol[sym2d].mean(axis=0)}
    for mode, axis_len in ((1, rows), (2, cols)):
        for k in CLASS_CHOICES:
            if axis_len < 4 * k:
                continue
            cls = _classes(spread_of[mode], k)
            pos_cls = np.repeat(cls, cols) if mode == 1 else np.tile(cls, rows)
            bits, tables = _class_tables(sym2d, pos_cls, k)
            yield bits + 8 * 0.6 * axis_len, [mode, k, *range(k), *cls.tolist()], tables, pos_cls, sym2d
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
            bits, tables = _class_tables(coded, np.repeat(cls, cols), k + 1)
            side = 8 * (0.6 * rows + 1.5 * ref.size)  # classes, and back distances (zeros compress away)
            yield bits + side, [3, k + 1, *range(k + 1), *cls.tolist(), *back.tolist()], tables, \
                np.repeat(cls, cols), coded


def choose_model(sym: np.ndarray, layout) -> tuple[list, list, np.ndarray, np.ndarray]:
    """(tables, model values after the tables, table index per symbol position, symbols as coded), minimising the
    estimated bytes of each part."""
    shared = quantize_counts(np.bincount(sym, minlength=256))
    shared_index = None
    tables, values, ctx_parts, coded_parts, pos = [], [], [], [], 0
    for rows, cols in layout:
        part = sym[pos: pos + rows * cols].reshape(rows, cols)
        pos += rows * cols
        _, part_values, freqs, pos_cls, coded = min(_part_options(part, shared), key=lambda o: o[0])
        coded_parts.append(coded.ravel())
        if part_values is None:  # the shared table, added the first time a part uses it
            if shared_index is None:
                shared_index = len(tables)
                tables.append(shared)
            values += [0, shared_index]
            ctx_parts.append(np.full(part.size, shared_index, dtype=np.int64))
            continue
        first = len(tables)
        tables += freqs
        if part_values[0] == 0:
            values += [0, first]
            ctx_parts.append(np.full(part.size, first, dtype=np.int64))
        else:
            k = part_values[1]
            values += part_values[:2] + [first + t for t in part_values[2:2 + k]] + part_values[2 + k:]
            ctx_parts.append(first + pos_cls)
    ctx = np.concatenate(ctx_parts) if ctx_parts else np.zeros(0, dtype=np.int64)
    coded = np.concatenate(coded_parts) if coded_parts else np.zeros(0, dtype=np.uint8)
    return tables, values, ctx, coded.astype(np.uint8)


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


def encode_symbols(sym: np.ndarray, ctx: np.ndarray, tables: list, lanes: int, prob_bits: int = PROB_BITS):
    """(final states u32[lanes], words u16[]) for symbols `sym` whose table indices are `ctx`."""
    n = sym.size
    full = np.stack([np.asarray(f, dtype=np.int64) for f in tables]) if tables else np.zeros((0, 256), np.int64)
    cum = np.concatenate([np.zeros((full.shape[0], 1), np.int64), np.cumsum(full, axis=1)[:, :-1]], axis=1)
    key = ctx * 256 + sym
    f_all, c_all = full.ravel()[key].astype(np.uint32), cum.ravel()[key].astype(np.uint32)
    del key
    if n and f_all.min() == 0:
        raise ValueError("rans: a symbol has zero frequency in its table")
    x = np.full(lanes, STATE_LOW, dtype=np.uint64)
    chunks = []
    shift = 32 - prob_bits
    for a in reversed(range(0, n, max(lanes, 1))):
        w = min(lanes, n - a)
        y, f, c = x[:w], f_all[a:a + w].astype(np.uint64), c_all[a:a + w]
        emit = y >= (f << np.uint64(shift))
        chunks.append((y[emit] & 0xFFFF).astype(np.uint16))
        y = np.where(emit, y >> np.uint64(16), y)
        x[:w] = ((y // f) << np.uint64(prob_bits)) + (y % f) + c
    words = np.concatenate(chunks[::-1]) if chunks else np.zeros(0, np.uint16)
    return x.astype(np.uint32), words


def decode_symbols(states: np.ndarray, words: np.ndarray, ctx: np.ndarray, tables: list, prob_bits: int,
                   what: str = "rans") -> np.ndarray:
    """Inverse of encode_symbols; FormatError if the stream is inconsistent (too few words, bad final state).

    Each step decodes one symbol in every lane with a handful of numpy calls on `lanes`-long vectors; the slot
    indices are kept and mapped to symbols once at the end (one large gather beats one per step)."""
    n, lanes = ctx.size, states.size
    slot_sym, slot_packed = _slot_tables(tables, prob_bits)
    mask = (1 << prob_bits) - 1
    x = states.astype(np.uint32).copy()
    words = words.astype(np.uint32)
    slots = np.empty(n, dtype=np.uint32)
    p = 0
    for a in range(0, n, max(lanes, 1)):
        w = min(lanes, n - a)
        idx = (ctx[a:a + w].astype(np.uint32) << prob_bits) | (x[:w] & mask)
        slots[a:a + w] = idx
        packed = slot_packed[idx]
        y = (packed >> prob_bits) * (x[:w] >> prob_bits) + (packed & mask)
        low = y < STATE_LOW
        k = int(np.count_nonzero(low))
        if p + k > words.size:
            raise FormatError(f"{what}: stream ends early")
        y[low] = (y[low] << 16) | words[p:p + k]
        p += k
        x[:w] = y
    if p != words.size or (lanes and not np.all(x == STATE_LOW)):
        raise FormatError(f"{what}: stream does not end where it should (damaged)")
    return slot_sym[slots]


# ---------------------------------------------------------------------------------------------------------------
# The codec interface (squeeze/codecs/__init__.py)

def encode(raw_bytes: bytes, params, layout) -> bytes:
    sym = np.frombuffer(raw_bytes, dtype=np.uint8)
    tables, part_values, ctx, coded = choose_model(sym, layout)
    model = np.array([len(tables)] + [v for f in tables for v in _table_values(f)] + part_values, dtype="<u2")
    model_z = zlib.compress(model.tobytes(), 9)
    lanes = lanes_for(sym.size)
    tables_256 = [np.asarray(f, dtype=np.int64) for f in tables]
    states, words = encode_symbols(coded.astype(np.int64), ctx, tables_256, lanes)
    head = np.array([PROB_BITS, 0], dtype=np.uint8).tobytes() + np.array([lanes], "<u2").tobytes() \
        + np.array([len(model_z)], "<u4").tobytes()
    return head + model_z + states.astype("<u4").tobytes() + words.astype("<u2").tobytes()


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
    """A parsed model: tables as 256-entry frequency arrays, the table index of every symbol position, the row
    references of mode-3 parts as (part offset, cols, back distances), and a short description of each part's model."""
    tables: list
    ctx: np.ndarray
    references: list
    part_models: list
    referenced: set         # table indices some part names: only these get decoder lookup tables


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
    ctx_parts, references, part_models, referenced, offset = [], [], [], set(), 0
    for rows, cols in layout:
        offset += rows * cols
        mode = int(cur.take()[0])
        if mode == 0:
            t = int(cur.take()[0])
            if t >= n_tables:
                raise FormatError(f"{what}: table index {t} out of range")
            ctx_parts.append(np.full(rows * cols, t, dtype=np.uint16))
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
        ids = ids.astype(np.uint16)  # 2 bytes per position: a declared size costs the reader 3 bytes a symbol at most
        ctx_parts.append(np.tile(ids[cls], rows) if mode == 2 else np.repeat(ids[cls], cols))
        part_models.append(f"{k} {'column' if mode == 2 else 'row'} classes")
        if mode == 3:
            back = cur.take(rows)
            if (back > np.arange(rows)).any():
                raise FormatError(f"{what}: a row refers to a row before the part")
            references.append((offset - rows * cols, cols, back))
            part_models[-1] = f"{np.count_nonzero(back)} row refs + {k - 1} row classes"
    if cur.i != cur.v.size:
        raise FormatError(f"{what}: model has {cur.v.size - cur.i} values too many")
    ctx = np.concatenate(ctx_parts) if ctx_parts else np.zeros(0, dtype=np.uint16)
    return Model(tables, ctx, references, part_models, referenced)


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


def decode(stored: bytes, raw_size: int, layout) -> bytes:
    st = read_stream(stored, raw_size, layout)
    tables, ctx = st.model.tables, st.model.ctx
    if len(st.model.referenced) < len(tables):  # tables no part names (never written by squeeze) get no lookups
        used = sorted(st.model.referenced)
        remap = np.zeros(len(tables), dtype=np.uint16)
        remap[used] = np.arange(len(used))
        tables, ctx = [tables[i] for i in used], remap[ctx]
    sym = decode_symbols(st.states, st.words, ctx, tables, st.prob_bits)
    return undo_row_references(sym, st.model.references).tobytes()


def stream_costs(stored: bytes, raw: bytes, layout) -> tuple[int, list, list]:
    """Where a rans section's bytes went: (overhead bytes: stream header, model and lane states; the coded bits of
    each part under its tables, in layout order; each part's model described). For inspect."""
    st = read_stream(stored, len(raw), layout)
    sym = np.frombuffer(raw, dtype=np.uint8).copy()
    for offset, cols, back in st.model.references[::-1]:  # the coded symbols: differences, undone in reverse order
        for r in np.flatnonzero(back)[::-1]:
            row, ref = offset + r * cols, offset + (r - back[r]) * cols
            sym[row:row + cols] -= sym[ref:ref + cols]
    freq = np.stack(st.model.tables).ravel()[st.model.ctx.astype(np.int64) * 256 + sym] if sym.size else np.zeros(0)
    bits = st.prob_bits - np.log2(np.maximum(freq, 1))
    ends = np.cumsum([r * c for r, c in layout]).astype(np.int64)
    starts = ends - [r * c for r, c in layout]
    return st.overhead, [float(bits[a:b].sum()) for a, b in zip(starts, ends)], st.model.part_models


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
 c=[];Z=[];z=0
 if sum(r*q for r,q in l)!=n:E("bad rans layout")
 for r,q in l:
  o=v[i];k=v[i+1];i+=2;z+=r*q
  if o==0:c.append(np.full(r*q,k));continue
  g=q if o==2 else r;y=v[i:i+k][v[i+k:i+k+g]];i+=k+g;c.append(np.tile(y,r)if o==2 else np.repeat(y,q))
  if o==3:Z.append((z-r*q,q,v[i:i+r]));i+=r
 c=np.concatenate(c).astype(np.uint32)<<P;Q=[(f,np.repeat(np.arange(256),f))for f in T]
 s=np.concatenate([q for f,q in Q]).astype(np.uint8)
 F=np.concatenate([f[q]<<P|np.arange(m)-(np.cumsum(f)-f)[q]for f,q in Q]).astype(np.uint32)
 x=np.frombuffer(b,"<u4",K,e).copy();w=np.frombuffer(b,"<u2",offset=e+4*K).astype(np.uint32);p=0;J=np.empty(n,np.uint32)
 for a in range(0,n,K or 1):
  h=min(K,n-a);j=c[a:a+h]|x[:h]&m-1;J[a:a+h]=j;g=F[j];y=(g>>P)*(x[:h]>>P)+(g&m-1);t=y<65536;k=np.count_nonzero(t)
  y[t]=y[t]<<16|w[p:p+k];p+=k;x[:h]=y
 if p!=w.size or(x!=65536).any():E("bad rans stream")
 u=s[J]
 for a,q,d in Z:
  for r in np.flatnonzero(d):u[a+r*q:a+r*q+q]+=u[a+(r-d[r])*q:a+(r-d[r])*q+q]
 return u.tobytes()
'''
