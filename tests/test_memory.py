"""Compile memory at scale (issue 14): the rans coder works a block of positions at a time, pack lays parts out per
section so encode codes from that buffer, the compile check decodes tensor by tensor. Each must leave the bytes
exactly as they were: these tests compare with the whole-array algorithms they replaced."""
import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch

import squeeze
from squeeze import codecs, format, loader, packing, pipeline
from squeeze.codecs import rans
from squeeze.errors import FormatError
from squeeze.passes import encode
from squeeze.recipe import Recipe
from squeeze.state import State
from squeeze.compiler import entries_from_state_dict


# the built-in recipe with zlib for brotli: the same sections and choices to make, in a fraction of the time
FAST = dataclasses.replace(Recipe(), encode=dataclasses.replace(Recipe().encode, candidates=("zlib", "rans")))


def whole_array_encode(raw: bytes, layout) -> bytes:
    """The encoder as it was before blocks: int64 tables, frequency and cumulative frequency per symbol."""
    sym = np.frombuffer(raw, np.uint8)
    tables, part_values, ctx, coded = rans.choose_model(sym, layout)
    model = np.array([len(tables)] + [v for f in tables for v in rans._table_values(f)] + part_values, dtype="<u2")
    import zlib
    model_z = zlib.compress(model.tobytes(), 9)
    lanes = rans.lanes_for(sym.size)
    n, p = sym.size, rans.PROB_BITS
    full = np.stack([np.asarray(f, np.int64) for f in tables]) if tables else np.zeros((0, 256), np.int64)
    cum = np.concatenate([np.zeros((full.shape[0], 1), np.int64), np.cumsum(full, axis=1)[:, :-1]], axis=1)
    key = ctx * 256 + coded.astype(np.int64)
    f_all, c_all = full.ravel()[key].astype(np.uint32), cum.ravel()[key].astype(np.uint32)
    x, chunks = np.full(lanes, rans.STATE_LOW, dtype=np.uint64), []
    for a in reversed(range(0, n, max(lanes, 1))):
        w = min(lanes, n - a)
        y, f, c = x[:w], f_all[a:a + w].astype(np.uint64), c_all[a:a + w]
        emit = y >= (f << np.uint64(32 - p))
        chunks.append((y[emit] & 0xFFFF).astype(np.uint16))
        y = np.where(emit, y >> np.uint64(16), y)
        x[:w] = ((y // f) << np.uint64(p)) + (y % f) + c
    words = np.concatenate(chunks[::-1]) if chunks else np.zeros(0, np.uint16)
    head = bytes([p, 0]) + np.array([lanes], "<u2").tobytes() + np.array([len(model_z)], "<u4").tobytes()
    return head + model_z + x.astype("<u4").tobytes() + words.astype("<u2").tobytes()


def mixed_section(seed: int) -> tuple[list, bytes]:
    """Parts that get each model: one table, row classes, column classes, row references; and tiny and empty ones."""
    rng = np.random.default_rng(seed)
    spread = np.tile(np.geomspace(0.3, 8, 96), (64, 1))
    cols = np.clip(np.round(rng.normal(0, 1, spread.shape) * spread) + 31, 0, 62)
    rows = np.clip(np.round(rng.normal(0, 1, (96, 64)) * np.geomspace(0.3, 8, 96)[:, None]) + 31, 0, 62)
    q = np.round(rng.laplace(0, 6, (200, 40)))
    rare = rng.random(200) < 0.4
    q[rare] = np.round(rng.laplace(0, 6, 40)) + np.round(rng.normal(0, 0.4, (rare.sum(), 40)))
    refs = np.clip(q + 127, 0, 254)
    plain = np.round(rng.laplace(0, 2, (50, 100))) + 40
    parts = [plain, cols, np.zeros((0, 7)), rows, refs, np.full((1, 3), 5.0)]
    layout = [p.shape for p in parts]
    return layout, b"".join(p.astype(np.uint8).tobytes() for p in parts)


@pytest.mark.parametrize("block", [None, 1, 5])
@pytest.mark.parametrize("seed", range(2))
def test_blocked_encoder_writes_the_whole_array_encoders_bytes(seed, block, monkeypatch):
    layout, raw = mixed_section(seed)
    assert set(_part_modes(raw, layout)) == {0, 1, 2, 3}  # every model is exercised
    if block is not None:  # blocks of a few steps: every block boundary falls inside some part
        monkeypatch.setattr(rans, "BLOCK", block * rans.lanes_for(len(raw)))
    stored = codecs.encode("rans", raw, None, layout)
    assert stored == whole_array_encode(raw, layout)
    assert codecs.decode("rans", stored, len(raw), "s", layout) == raw


def _part_modes(raw: bytes, layout) -> list:
    st = rans.read_stream(rans.encode(raw, None, layout), len(raw), layout)
    return [p.mode for p in st.model.contexts.parts]


def test_stream_costs_equal_the_per_symbol_sum():
    """inspect's per-part bits from counts x costs equal the sum of every symbol's cost under its table."""
    layout, raw = mixed_section(3)
    stored = rans.encode(raw, None, layout)
    _, _, ctx, coded = rans.choose_model(np.frombuffer(raw, np.uint8), layout)
    st = rans.read_stream(stored, len(raw), layout)
    assert np.array_equal(st.model.ctx, ctx)
    per_symbol = st.prob_bits - np.log2(np.stack(st.model.tables).ravel()[ctx * 256 + coded])
    overhead, bits, _ = rans.stream_costs(stored, raw, layout)
    ends = np.cumsum([r * c for r, c in layout])
    expected = [float(per_symbol[e - r * c:e].sum()) for e, (r, c) in zip(ends, layout)]
    assert overhead == st.overhead
    assert np.allclose(bits, expected, rtol=1e-12, atol=1e-9)


def test_decoder_blocks_and_unreferenced_tables(monkeypatch):
    layout, raw = mixed_section(4)
    stored = rans.encode(raw, None, layout)
    monkeypatch.setattr(rans, "BLOCK", 3 * rans.lanes_for(len(raw)))
    assert rans.decode(stored, len(raw), layout) == raw
    contexts = rans.read_stream(stored, len(raw), layout).model.contexts
    table_of = np.arange(100, dtype=np.uint16)[::-1].copy()
    assert np.array_equal(contexts.remapped(table_of).block(0, len(raw))[0], table_of[contexts.block(0, len(raw))[0]])


@pytest.fixture(scope="module")
def packed(fixture_small):
    recipe = FAST
    state = State(entries=entries_from_state_dict(fixture_small), recipe=recipe)
    for name, fn, config in pipeline.passes_for(recipe):
        if name == "encode":
            return state, config
        state = fn(state, config)


def test_pack_lays_each_sections_parts_out_in_one_buffer(packed):
    state, config = packed
    by_section = {}
    for e in state.stored_entries():
        for kind, data in e.parts:
            assert isinstance(data, memoryview) and data.readonly
            by_section.setdefault(encode.group_key(e, kind, config.group_by), []).append(data)
    for parts in by_section.values():
        raw = packing.joined(parts)
        assert isinstance(raw, memoryview) and raw.obj is parts[0].obj  # no copy
        assert bytes(raw) == b"".join(bytes(p) for p in parts)
    assert packing.joined([b"ab", memoryview(b"cd")]) == b"abcd"
    a = memoryview(bytearray(b"abcdef")).toreadonly()
    assert packing.joined([a[2:4], a[0:2]]) == b"cdab"  # out of order: a joined copy
    assert packing.joined([a[0:2], a[2:4]]) == b"abcd"  # not the whole buffer: a joined copy


def test_encode_output_is_the_same_from_bytes_parts_any_worker_count_and_order(packed, monkeypatch):
    state, config = packed
    reference = encode.run(state, config).sections
    as_bytes = dataclasses.replace(state, entries=tuple(
        dataclasses.replace(e, parts=tuple((k, bytes(d)) for k, d in e.parts)) for e in state.entries))
    assert encode.run(as_bytes, config).sections == reference
    assert encode.run(state, dataclasses.replace(config, workers=1)).sections == reference
    monkeypatch.setattr(encode, "HEAVY_BYTES", 0)  # every byte-compressor job in the one-at-a-time lane
    assert encode.run(state, config).sections == reference


def test_check_decodes_every_tensor_and_refuses_damage(fixture_small, tmp_path):
    blob = squeeze.compile(fixture_small, FAST)
    art = format.read(blob)
    stored = [t for t in art.tensors if "alias" not in t and "stack" not in t]
    assert loader.check(blob) == len(stored)
    with pytest.raises(FormatError, match="more than 1,000"):
        loader.check(blob, max_decoded_bytes=1000)
    assert set(loader.load(blob)) == set(fixture_small)
    i = max(range(len(art.sections)), key=lambda i: art.sections[i]["size"])
    damaged = bytearray(blob)
    damaged[art.offsets[i] + art.sections[i]["size"] // 2] ^= 1
    with pytest.raises(FormatError, match="checksum mismatch"):
        loader.check(bytes(damaged))


def test_load_lets_decoded_sections_go(fixture_small):
    blob = squeeze.compile(fixture_small, FAST)
    art = format.read(blob)
    tensors = {t["name"]: x for t, x in loader._stored_tensors(art)}
    assert art._decoded == {}  # every decoded section was let go after its last tensor
    reference = squeeze.load(blob)
    for name, x in tensors.items():
        assert torch.equal(x, reference[name])


def test_encode_returns_sections_and_lets_the_parts_go(packed):
    state, config = packed
    encoded = encode.run(state, config)
    assert all(e.parts == () for e in encoded.entries)
    assert all(e.parts for e in state.stored_entries())  # the state pack returned is left as it was
    assert encoded.nbytes() == sum(len(s.stored) for s in encoded.sections)


def test_memory_helpers_are_harmless():
    """In a child process: fixing the mmap threshold lasts for the rest of the process that calls it."""
    code = ("from squeeze import memory; import numpy as np; memory.trim(); memory.keep_large_blocks_mapped(); "
            "a = np.ones(10 << 20, np.uint8); del a; memory.trim(); print(int(np.ones(1 << 23, np.uint8).sum()))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == str(1 << 23)
