"""Codecs and code layouts: exact round trips (property tests on random data are fine here), bounded decoding."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from squeeze import codecs, packing
from squeeze.codecs import EncodeParams
from squeeze.errors import FormatError

FAST = EncodeParams(zlib_level=6, zstd_level=3, brotli_quality=5, brotli_window=22, lzma_preset=1,
                    lzma_extreme=False)


@pytest.mark.parametrize("name", codecs.NAMES)
@given(data=st.binary(max_size=4096))
@settings(max_examples=40, deadline=None)
def test_round_trip(name, data):
    stored = codecs.encode(name, data, FAST)
    assert codecs.decode(name, stored, len(data), "s") == data


@pytest.mark.parametrize("name", [n for n in codecs.NAMES if n != "raw"])
def test_decoding_stops_at_the_declared_size(name):
    """A stream that inflates past its declared size (a bomb) is refused without producing the whole output."""
    stored = codecs.encode(name, bytes(10_000_000), FAST)
    with pytest.raises(FormatError, match="section x: .*more"):
        codecs.decode(name, stored, 100, "section x")


@pytest.mark.parametrize("name", [n for n in codecs.NAMES if n != "raw"])
def test_truncated_stream_is_an_error(name):
    data = np.random.default_rng(1).integers(0, 8, 50_000, dtype=np.uint8).tobytes()
    stored = codecs.encode(name, data, FAST)
    with pytest.raises(FormatError, match="section y"):
        codecs.decode(name, stored[: len(stored) // 2], len(data), "section y")


def test_unknown_codec_is_an_error():
    with pytest.raises(FormatError, match="unknown codec 'snappy'"):
        codecs.decode("snappy", b"", 0, "section z")


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("layout", ["byte", "dense"])
@given(n=st.integers(0, 3000), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=25, deadline=None)
def test_pack_round_trip(bits, layout, n, seed):
    u = np.random.default_rng(seed).integers(0, (1 << bits) - 1, n, endpoint=True).astype(np.uint8)
    data = packing.pack(u, bits, layout)
    assert len(data) == packing.packed_size(n, bits, layout)
    assert np.array_equal(packing.unpack(data, n, bits, layout), u)


def test_dense_packing_wastes_no_bits():
    """int6: 4 codes in 3 bytes, little-endian bit order as docs/FORMAT.md specifies."""
    u = np.array([1, 2, 3, 63], dtype=np.uint8)
    assert packing.pack(u, 6, "dense") == bytes([0b10_000001, 0b0011_0000, 0b111111_00])


def test_dense_packing_across_chunks():
    u = np.random.default_rng(2).integers(0, 31, (1 << 20) + 12345).astype(np.uint8)
    assert np.array_equal(packing.unpack(packing.pack(u, 5, "dense"), u.size, 5, "dense"), u)


@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_shuffle_round_trip(width):
    data = np.random.default_rng(width).integers(0, 255, 64 * width, dtype=np.uint8).tobytes()
    shuffled = packing.shuffle(data, width)
    assert packing.unshuffle(shuffled, width) == data
    if width == 2:
        assert shuffled[:64] == data[0::2]
