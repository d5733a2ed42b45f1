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


@pytest.mark.slow
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


# ---------------------------------------------------------------------------------------------------------------
# The codec protocol, checked at import (squeeze/codecs/__init__.py)

def _codec_module(name="fake", **attrs):
    """A codec module that follows the protocol, with `attrs` replaced (None: removed)."""
    import types
    m = types.ModuleType(f"squeeze.codecs.{name}")
    m.ID, m.NAME, m.DECODE_ERRORS = 200, name, (ValueError,)
    m.DECODER_IMPORT, m.DECODER_EXPR = "import fake", "lambda b,n,l:b"
    m.encode = lambda raw, params: bytes(raw)
    m.decode = lambda stored, raw_size: bytes(stored)
    for k, v in attrs.items():
        if v is None:
            delattr(m, k)
        else:
            setattr(m, k, v)
    return m


def test_the_registered_codecs_follow_the_protocol():
    assert codecs.NAMES == ("raw", "zlib", "zstd", "brotli", "lzma", "rans")  # recipes list them in this order
    assert sorted(codecs.BY_ID) == list(range(len(codecs.NAMES)))
    for name in codecs.NAMES:
        codecs.check_protocol(codecs.get(name))
    assert codecs.registry([_codec_module()])[0]["fake"].ID == 200


@pytest.mark.parametrize("attrs, message", [
    (dict(DECODER_EXPR=None), "missing DECODER_EXPR"),
    (dict(decode=None), "missing decode"),
    (dict(DECODE_ERRORS=None), "missing DECODE_ERRORS"),
    (dict(ID=256), "ID = 256"),
    (dict(ID=True), "ID = True"),
    (dict(NAME="Zip"), "NAME = 'Zip'"),
    (dict(NAME="auto"), "NAME = 'auto'"),
    (dict(USES_LAYOUT=1), "USES_LAYOUT = 1"),
    (dict(USES_LAYOUT=True), r"encode must be a function of \(raw, params, layout\)"),
    (dict(USES_LAYOUT=True, encode=lambda raw, params, layout: raw),
     r"decode must be a function of \(stored, raw_size, layout\)"),
    (dict(encode=lambda raw: raw), r"encode must be a function of \(raw, params\)"),
    (dict(encode="zlib"), "encode must be a function"),
    (dict(DECODE_ERRORS=(Exception,)), "DECODE_ERRORS must name the library.s own error types, not Exception"),
    (dict(DECODE_ERRORS=ValueError), "DECODE_ERRORS = .*: expected a tuple of exception types"),
    (dict(DECODER_IMPORT="import a, b"), "DECODER_IMPORT = .import a, b.: expected"),
    (dict(DECODER_EXPR="lambda b,n,l:"), "DECODER_EXPR is not valid Python"),
    (dict(DECODER_DEF="def R(b,n,l)\n return b\n"), "DECODER_DEF is not valid Python"),
])
def test_a_broken_codec_module_fails_at_import_naming_module_and_attribute(attrs, message):
    with pytest.raises(codecs.CodecProtocolError, match=f"codec module squeeze.codecs.fake: {message}"):
        codecs.registry([_codec_module(**attrs)])


def test_codec_ids_and_names_are_unique():
    with pytest.raises(codecs.CodecProtocolError, match="codec module squeeze.codecs.lz4: ID 5 is already taken "
                                                        "by squeeze.codecs.rans"):
        codecs.registry([codecs.get("rans"), _codec_module("lz4", ID=5)])
    with pytest.raises(codecs.CodecProtocolError, match="squeeze.codecs.zlib2: NAME 'zlib' is already taken"):
        codecs.registry([codecs.get("zlib"), _codec_module("zlib2", NAME="zlib", ID=9)])


def test_only_the_codec_libraries_errors_become_format_errors(monkeypatch):
    """A damaged stream is a FormatError; a bug in a codec's own decoder (any other exception) is not disguised."""
    rans = codecs.get("rans")
    layout = [(4, 4)]
    stored = codecs.encode("rans", bytes(range(16)), FAST, layout)
    with pytest.raises(FormatError, match="section r: rans: stream is truncated"):
        codecs.decode("rans", stored[:-2] + b"\0", 16, "section r", layout)

    def buggy(*args):
        raise IndexError("a bug")
    monkeypatch.setattr(rans, "decode_symbols", buggy)
    with pytest.raises(IndexError, match="a bug"):
        codecs.decode("rans", stored, 16, "section r", layout)
    monkeypatch.setattr(codecs.get("zlib"), "decode", buggy)
    with pytest.raises(IndexError):
        codecs.decode("zlib", b"", 0, "section z")
