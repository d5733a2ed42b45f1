"""Hostile and damaged inputs: every malformed artifact, unsafe checkpoint and out-of-range tensor is refused with one
exact line (FormatError / CheckpointError for the library, ValueError("squeeze: ...") for the tiny decoder), and a
failed compile never leaves a partial file."""
import argparse
import importlib.util
import os
import pickle
import re
import struct
import tracemalloc
import zlib

import pytest
import torch
from click.testing import CliRunner

import squeeze
from squeeze import codecs, cli, decoder, format
from squeeze.checkpoint import load_checkpoint
from squeeze.compiler import entries_from_state_dict
from squeeze.errors import CheckpointError, FormatError, SqueezeError
from squeeze.recipe import parse

from bench.fuzz_artifacts import Parts, assemble, parts_of, with_raw_header
from conftest import ROOT, bitwise_equal

RECIPE = parse('[defaults]\nbits = 6\ncodec = "zlib"\n[keep_float]\nmax_numel = 64\n', "t.toml")
CODEC_NAMES = ", ".join(codecs.NAMES)
DTYPE_NAMES = "f32, f16, bf16, f64, f8e4m3, f8e5m2, i8, i16, i32, i64, u8, bool"


def small_state_dict() -> dict:
    """Sections of the compiled artifact: 0 embedding.codes, 1 scales.f16, 2 other.codes, 3 float.f16, 4 raw.i64,
    5 raw.bool. Tensors: emb.weight (int6), head.weight (alias), proj.weight (int6), proj_t.weight (transposed
    alias), gain (f16 data), step (i64), mask (bool)."""
    g = torch.Generator().manual_seed(0)
    emb, proj = torch.randn(16, 8, generator=g), torch.randn(8, 16, generator=g)
    return {"emb.weight": emb, "head.weight": emb, "proj.weight": proj, "proj_t.weight": proj.t().contiguous(),
            "gain": torch.rand(8, generator=g), "step": torch.tensor([3], dtype=torch.int64),
            "mask": torch.tensor([True, False, True])}


@pytest.fixture(scope="module")
def blob() -> bytes:
    return squeeze.compile(small_state_dict(), RECIPE)


def edited(blob: bytes, edit) -> bytes:
    """The artifact with its header changed by edit(header), re-written with valid CRCs."""
    parts = parts_of(blob)
    edit(parts.header)
    return assemble(parts)


def tensor(header: dict, name: str) -> dict:
    return next(t for t in header["tensors"] if t["name"] == name)


def load_error(data: bytes, **kwargs) -> str:
    with pytest.raises(FormatError) as err:
        squeeze.load(data, **kwargs)
    return str(err.value)


def test_the_base_artifact_is_laid_out_as_the_cases_assume(blob):
    header = format.read(blob).header
    assert [s["name"] for s in header["sections"]] == ["embedding.codes", "scales.f16", "other.codes", "float.f16",
                                                        "raw.i64", "raw.bool"]
    assert tensor(header, "proj_t.weight")["t"] == 1 and tensor(header, "gain")["store"] == "f16"


# ---------------------------------------------------------------------------------------------------------------
# Preamble

def _with_preamble(blob: bytes, **fields) -> bytes:
    names = ["magic", "major", "minor", "codec", "reserved", "size", "raw", "crc"]
    values = dict(zip(names, format.PREAMBLE.unpack_from(blob)))
    values.update(fields)
    return format.PREAMBLE.pack(*values.values()) + blob[format.PREAMBLE.size:]


@pytest.mark.parametrize("damage,message", [
    (lambda b: b[:4], "too short to be a squeeze artifact (4 bytes)"),
    (lambda b: b"PK\x03\x04" + b[4:], r"not a squeeze artifact (bad magic b'PK\x03\x04')"),
    (lambda b: _with_preamble(b, major=2), "unsupported format version 2.1 (this reader reads 1.x)"),
    (lambda b: _with_preamble(b, reserved=7), "preamble: reserved byte is 7, must be 0"),
    (lambda b: _with_preamble(b, codec=9), "header: unknown codec id 9"),
    (lambda b: _with_preamble(b, codec=5), "header: codec rans (id 5) codes sections only, never the header"),
    (lambda b: _with_preamble(b, raw=(16 << 20) + 1), "header: declared size 16777217 exceeds 16777216"),
    (lambda b: b[:30], "header: truncated (10 of {header_size} bytes)"),
    (lambda b: b[:40] + bytes([b[40] ^ 1]) + b[41:], "header: checksum mismatch (the file is damaged)"),
    (lambda b: _with_preamble(b, raw=100), "header: zlib stream decodes to more bytes, header declares 100"),
])
def test_bad_preamble(blob, damage, message):
    message = message.format(header_size=format.read(blob).header_size)
    assert load_error(damage(blob)) == f"artifact: {message}"


def test_a_higher_minor_version_is_read(blob):
    assert list(squeeze.load(_with_preamble(blob, minor=9))) == list(small_state_dict())


# ---------------------------------------------------------------------------------------------------------------
# The header's JSON text

@pytest.mark.parametrize("text,message", [
    (b"\xff{}", "not valid UTF-8 (invalid start byte at byte 0)"),
    (b'{"sections": [', "not valid JSON (Expecting value: line 1 column 15 (char 14))"),
    (b'{"sections": [], "tensors": [], "meta": {"x": NaN}}', "not valid JSON (NaN is not JSON)"),
    (b'{"sections": [], "tensors": [], "x": -Infinity}', "not valid JSON (-Infinity is not JSON)"),
    (b'{"sections": [], "tensors": [], "x": 1234567890123456789012345}', "not valid JSON (an integer of 25 digits)"),
    (b'{"sections": ' + b"[" * 100000 + b"]" * 100000 + b"}", "not valid JSON (nested too deeply)"),
    (b"[]", "expected a JSON object, got []"),
    (b'{"tensors": []}', "'sections' must be a list, missing"),
    (b'{"sections": {}, "tensors": []}', "'sections' must be a list, got {}"),
    (b'{"sections": [], "tensors": "x"}', "'tensors' must be a list, got 'x'"),
    (b'{"sections": [], "tensors": [], "meta": ["x"]}', "'meta' must be an object of strings, got ['x']"),
    (b'{"sections": [], "tensors": [], "meta": {"recipe": 3}}',
     "'meta' must be an object of strings, got {'recipe': 3}"),
    (b'{"sections": [], "tensors": [], "meta": {"recipe": "\\ud800"}}',
     r"'meta' must be an object of strings, got {'recipe': '\ud800'}"),
])
def test_bad_header_text(blob, text, message):
    damaged = with_raw_header(Parts(header=None, sections=[], header_codec="zlib"), text)
    assert load_error(damaged) == f"artifact: header: {message}"


# ---------------------------------------------------------------------------------------------------------------
# Sections

def _section(i: int, /, **fields):
    return lambda h: h["sections"][i].update(fields)


@pytest.mark.parametrize("edit,message", [
    (lambda h: h["sections"].__setitem__(0, [1, 2]), "section 0: expected an object, got [1, 2]"),
    (_section(0, name=3), "section 0: 'name' must be a non-empty printable string, got 3"),
    (_section(0, name="a\nb"), r"section 0: 'name' must be a non-empty printable string, got 'a\nb'"),
    (lambda h: h["sections"][0].pop("name"), "section 0: 'name' must be a non-empty printable string, missing"),
    (_section(0, codec=["zlib"]),
     f"section 0 (embedding.codes): 'codec' must be a codec name ({CODEC_NAMES}), got ['zlib']"),
    (_section(0, codec="gzip"), "section 0 (embedding.codes): unknown codec 'gzip'"),
    (_section(0, size="126"), "section 0 (embedding.codes): 'size' must be an integer >= 0, got '126'"),
    (_section(0, size=-1), "section 0 (embedding.codes): 'size' must be an integer >= 0, got -1"),
    (_section(0, raw=True), "section 0 (embedding.codes): 'raw' must be an integer in 0..4294967295, got True"),
    (_section(0, raw=2**32), "section 0 (embedding.codes): 'raw' must be an integer in 0..4294967295, got 4294967296"),
    (_section(0, raw=128.0), "section 0 (embedding.codes): 'raw' must be an integer in 0..4294967295, got 128.0"),
    (_section(0, crc=2**32), "section 0 (embedding.codes): 'crc' must be an integer in 0..4294967295, got 4294967296"),
    (_section(0, shuffle=3), "section 0 (embedding.codes): 'shuffle' must be one of 1, 2, 4, 8, got 3"),
    (_section(0, shuffle=2.0), "section 0 (embedding.codes): 'shuffle' must be one of 1, 2, 4, 8, got 2.0"),
    (_section(5, shuffle=2), "section 5 (raw.bool): 'raw' 3 is not a multiple of the shuffle width 2"),
    (_section(5, size=10**6), f"section 5 (raw.bool): truncated (file ends {10**6 - 11} bytes early)"),
    (_section(5, size=10), "1 unexpected bytes after the last section"),
    (_section(0, crc=1), "section 0 (embedding.codes): checksum mismatch (the file is damaged)"),
    (_section(0, raw=127), "section 0 (embedding.codes): codes of emb.weight (bytes 0..128) lies outside its 127 "
                           "decoded bytes"),
    (_section(0, raw=129), "section 0 (embedding.codes): parts cover 128 of 129 bytes"),
])
def test_bad_section_fields(blob, edit, message):
    assert load_error(edited(blob, edit)) == f"artifact: {message}"


def test_sections_beyond_the_decoded_bound_are_refused(blob):
    assert load_error(blob, max_decoded_bytes=200) == (
        "artifact: section 2 (other.codes): sections decode to more than 200 bytes in all, this reader's bound "
        "(load(..., max_decoded_bytes=N) reads larger artifacts)")
    # 331 decoded bytes fit; the tensors returned take 16·8·4 ·3 (emb, proj, proj transposed) + 32 + 8 + 3 bytes
    assert load_error(blob, max_decoded_bytes=400) == (
        "artifact: tensors decode to 1,579 bytes, more than 400, this reader's bound (load(..., max_decoded_bytes=N) "
        "reads larger artifacts)")
    assert len(squeeze.load(blob, max_decoded_bytes=1579)) == 7


@pytest.mark.parametrize("codec", ["zlib", "zstd", "brotli", "lzma"])
def test_decompression_bomb_stops_at_the_declared_size(blob, codec):
    """16 MiB of zeros coded in a few kB, behind a valid CRC, in place of the 16-byte f16 section: the codec stops
    one byte past the declared size, so the reader never holds the bomb's output."""
    parts = parts_of(blob)
    bomb = codecs.encode(codec, bytes(16 << 20), codecs.EncodeParams(zstd_level=1, brotli_quality=1, lzma_preset=0))
    parts.sections[3] = bomb
    parts.header["sections"][3].update(codec=codec, size=len(bomb), crc=format.crc32(bomb))
    damaged = assemble(parts)
    tracemalloc.start()
    try:
        message = load_error(damaged)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert message == f"artifact: section 3 (float.f16): {codec} stream decodes to more bytes, header declares 16"
    assert peak < 2 << 20


# ---------------------------------------------------------------------------------------------------------------
# Tensors

def _tensor(name: str, /, **fields):
    return lambda h: tensor(h, name).update(fields)


def _drop(name: str, key: str):
    return lambda h: tensor(h, name).pop(key)


def _q(name: str, /, **fields):
    return lambda h: tensor(h, name)["q"].update(fields)


E = "tensor emb.weight"
Q = f"{E}: invalid quantization scheme"


@pytest.mark.parametrize("edit,message", [
    (lambda h: h["tensors"].__setitem__(0, "x"), "header: tensor 0: expected an object, got 'x'"),
    (_drop("emb.weight", "name"), "header: tensor 0: 'name' must be a non-empty printable string, missing"),
    (_tensor("emb.weight", name=""), "header: tensor 0: 'name' must be a non-empty printable string, got ''"),
    (_tensor("emb.weight", name=["emb"]), "header: tensor 0: 'name' must be a non-empty printable string, got ['emb']"),
    (lambda h: h["tensors"].append(dict(h["tensors"][0])), f"{E}: duplicate name"),
    (_tensor("emb.weight", shape="16x8"), f"{E}: invalid shape '16x8': must be a list of at most 8 integers in "
                                          f"0..1099511627776"),
    (_tensor("emb.weight", shape=[16, [8]]), f"{E}: invalid shape [16, [8]]: must be a list of at most 8 integers in "
                                             f"0..1099511627776"),
    (_tensor("emb.weight", shape=[16, -8]), f"{E}: invalid shape [16, -8]: must be a list of at most 8 integers in "
                                            f"0..1099511627776"),
    (_tensor("emb.weight", shape=[16, 8.0]), f"{E}: invalid shape [16, 8.0]: must be a list of at most 8 integers "
                                             f"in 0..1099511627776"),
    (_tensor("emb.weight", shape=[1] * 9), f"{E}: invalid shape [1, 1, 1, 1, 1, 1, 1, 1, 1]: must be a list of at "
                                           f"most 8 integers in 0..1099511627776"),
    (_tensor("emb.weight", shape=[2**41]), f"{E}: invalid shape [2199023255552]: must be a list of at most 8 "
                                           f"integers in 0..1099511627776"),
    (_tensor("emb.weight", shape=[2**20, 2**20]), f"{E}: shape [1048576, 1048576] has too many elements (at most "
                                                  f"1099511627775)"),
    (_tensor("emb.weight", dtype=["f32"]), f"{E}: 'dtype' must be one of {DTYPE_NAMES}, got ['f32']"),
    (_tensor("emb.weight", role="head"), f"{E}: 'role' must be one of embedding, attention, mlp, control, other, "
                                         f"got 'head'"),
    (_tensor("emb.weight", data=[3, 0, 16]), f"{E}: has 'data' and 'q': exactly one storage form is allowed"),
    (_drop("emb.weight", "q"), f"{E}: has none of alias, data, q, stack: exactly one storage form is allowed"),
    (_tensor("gain", codes=[0, 0, 1]), "tensor gain: 'codes' is no part of a tensor stored as 'data'"),
    # aliases
    (_tensor("head.weight", alias="head.weight"), "tensor head.weight: an alias of itself"),
    (_tensor("head.weight", alias="nope"), "tensor head.weight: alias target 'nope' does not exist"),
    (_tensor("head.weight", alias="proj_t.weight"), "tensor head.weight: alias target 'proj_t.weight' is itself an "
                                                    "alias"),
    (_tensor("head.weight", alias=["emb.weight"]), "tensor head.weight: 'alias' must be the name of a stored tensor, "
                                                   "got ['emb.weight']"),
    (_tensor("head.weight", t=True), "tensor head.weight: 't' must be 0 or 1, got True"),
    (_tensor("head.weight", t=2), "tensor head.weight: 't' must be 0 or 1, got 2"),
    (_tensor("head.weight", shape=[128], t=1), "tensor head.weight: a transposed alias must be 2-D, its shape is "
                                               "[128]"),
    (_tensor("head.weight", shape=[8, 16]), "tensor head.weight: shape [8, 16] and dtype f32 differ from its alias "
                                            "target 'emb.weight' ([16, 8], f32)"),
    (_tensor("proj_t.weight", shape=[8, 16]), "tensor proj_t.weight: shape [8, 16] and dtype f32 differ from its "
                                              "alias target 'proj.weight' transposed ([16, 8], f32)"),
    (_tensor("head.weight", dtype="f16"), "tensor head.weight: shape [16, 8] and dtype f16 differ from its alias "
                                          "target 'emb.weight' ([16, 8], f32)"),
    # quantized
    (_tensor("emb.weight", q=[6, 0]), f"{Q}: 'q' must be an object, got [6, 0]"),
    (_q("emb.weight", bits="6"), f"{Q}: 'bits' must be an integer in 2..8, got '6'"),
    (_q("emb.weight", bits=9), f"{Q}: 'bits' must be an integer in 2..8, got 9"),
    (_q("emb.weight", group=-1), f"{Q}: 'group' must be an integer >= 0, got -1"),
    (_q("emb.weight", pack=None), f"{Q}: 'pack' must be one of byte, dense, got None"),
    (_q("emb.weight", sdtype="f64"), f"{Q}: 'sdtype' must be one of f16, bf16, f32, got 'f64'"),
    (lambda h: tensor(h, "emb.weight")["q"].pop("clip"), f"{Q}: 'clip' must be a string, missing"),
    (_tensor("emb.weight", dtype="i8"), f"{Q}: a i8 tensor cannot be quantized (dtype must be one of f32, f16, "
                                        f"bf16, f64, f8e4m3, f8e5m2)"),
    # stored as-is or cast
    (_tensor("gain", store="f8"), f"tensor gain: 'store' must be one of {DTYPE_NAMES}, got 'f8'"),
    (_tensor("gain", store="i16"), "tensor gain: 'store' i16 cannot hold a f32 tensor (one of f32, f16, bf16, f64, "
                                   "f8e4m3, f8e5m2)"),
    (_tensor("step", store="f64"), "tensor step: 'store' must equal its dtype i64 for an integer or bool tensor, "
                                   "got f64"),
    # parts
    (_tensor("gain", data="3,0,16"), "tensor gain: invalid data reference '3,0,16': must be [section, offset, "
                                     "length] of integers >= 0"),
    (_tensor("gain", data=[3, 0]), "tensor gain: invalid data reference [3, 0]: must be [section, offset, length] "
                                   "of integers >= 0"),
    (_tensor("gain", data=[3, -1, 16]), "tensor gain: invalid data reference [3, -1, 16]: must be [section, offset, "
                                        "length] of integers >= 0"),
    (_tensor("gain", data=[99, 0, 16]), "tensor gain: invalid data reference [99, 0, 16]: there is no section 99 "
                                        "(6 sections)"),
    (_tensor("gain", data=[3, 0, 15]), "tensor gain: data is 15 bytes, its shape and scheme imply 16"),
    (_tensor("gain", data=[3, 2**40, 16]), "section 3 (float.f16): data of gain (bytes 1099511627776..1099511627792) "
                                           "lies outside its 16 decoded bytes"),
    (_tensor("proj.weight", scales=[1, 16, 16]), "section 1 (scales.f16): parts overlap at scales of proj.weight "
                                                 "(offset 16, the part before ends at 32)"),
    (lambda h: (_section(1, raw=49)(h), _tensor("proj.weight", scales=[1, 33, 16])(h)),
     "section 1 (scales.f16): parts leave a hole at scales of proj.weight (offset 33, the part before ends at 32)"),
])
def test_bad_tensor_fields(blob, edit, message):
    assert load_error(edited(blob, edit)) == f"artifact: {message}"


def _replace_section(blob: bytes, i: int, raw: bytes) -> bytes:
    """The artifact with section i's decoded bytes replaced (same length), CRC and size valid."""
    parts = parts_of(blob)
    stored = zlib.compress(raw)
    parts.sections[i] = stored
    parts.header["sections"][i].update(size=len(stored), crc=format.crc32(stored))
    return assemble(parts)


def test_damage_only_decoding_can_see(blob):
    assert load_error(_replace_section(blob, 5, b"\x01\x02\x00")) == \
        "artifact: tensor mask: bool data holds a byte other than 0 or 1"
    assert load_error(_replace_section(blob, 0, b"\xff" * 128)) == \
        "artifact: tensor emb.weight: a stored code 255 is out of range for int6 (0..62)"


def test_a_group_wider_than_the_row_is_one_group(blob):
    """group 2^40 on an 8-wide row means one scale per row, like group 0: same bytes, same tensor, no 2^40-wide
    broadcast."""
    wide = edited(blob, _q("emb.weight", group=2**40))
    assert bitwise_equal(squeeze.load(wide)["emb.weight"], squeeze.load(blob)["emb.weight"])


def test_unreadable_paths(tmp_path):
    assert load_error(tmp_path) == f"{tmp_path}: cannot read (not a regular file)"
    assert load_error(tmp_path / "none.sqz") == f"{tmp_path / 'none.sqz'}: cannot read (No such file or directory)"


def test_no_pickle_in_the_format_or_the_loaders():
    sources = [(ROOT / "squeeze" / f).read_text() for f in ("format.py", "loader.py", "dtypes.py", "packing.py")]
    sources.append(decoder.emit(codecs.NAMES))
    for source in sources:
        assert "pickle" not in source and "torch.load" not in source and "eval(" not in source


# ---------------------------------------------------------------------------------------------------------------
# The tiny decoder

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The emitted decoder for every codec, as a module."""
    path = tmp_path_factory.mktemp("tiny") / "decode_all.py"
    path.write_text(decoder.emit(codecs.NAMES))
    spec = importlib.util.spec_from_file_location("decode_all", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_error(tiny, tmp_path, data: bytes) -> ValueError:
    path = tmp_path / "m.sqz"
    path.write_bytes(data)
    with pytest.raises(ValueError) as err:
        tiny.squeeze_load(str(path))
    assert err.value.__suppress_context__  # no "during handling of the above exception" chain
    return str(err.value).replace(str(path), "P")


@pytest.mark.parametrize("damage,message", [
    (lambda b: b[:4], "squeeze: P: not a squeeze v1.0-1.1 artifact"),
    (lambda b: b"SQZ\x00\x01" + b"\x00" * 5,
     "squeeze: P: malformed artifact ValueError('buffer is smaller than requested size')"),
    (lambda b: edited(b, _tensor("gain", dtype="x" * 200)),  # the exception's repr is cut at 99 characters
     "squeeze: P: malformed artifact KeyError('" + "x" * 89),
    (lambda b: _with_preamble(b, major=2), "squeeze: P: not a squeeze v1.0-1.1 artifact"),
    (lambda b: _with_preamble(b, codec=9), "squeeze: P: malformed artifact IndexError('list index out of range')"),
    (lambda b: b[:40] + bytes([b[40] ^ 1]) + b[41:], "squeeze: P: header checksum mismatch"),
    (lambda b: b[:-1], "squeeze: P: section 'raw.bool' checksum mismatch"),
    (lambda b: edited(b, _section(3, codec="\nraw")), r"squeeze: P: codec '\nraw' not in this decoder"),
    (lambda b: b + b"\x00", "squeeze: P: bad length"),
    (lambda b: edited(b, lambda h: h.pop("sections")), "squeeze: P: malformed artifact KeyError('sections')"),
    (lambda b: edited(b, _tensor("gain", data=[3, 0, 15])),
     "squeeze: P: malformed artifact ValueError('buffer length (15 bytes) after offset (0 bytes) must be a multiple "
     "of element size (2)'"),
    (lambda b: edited(b, _tensor("emb.weight", dtype="f8")), "squeeze: P: malformed artifact KeyError('f8')"),
    (lambda b: edited(b, _q("emb.weight", bits=2**34)), "squeeze: P: bad bits"),
    (lambda b: with_raw_header(parts_of(b), b"{\xff"),
     "squeeze: P: malformed artifact UnicodeDecodeError('utf-8', b'{\\xff', 1, 2, 'invalid start byte')"),
])
def test_tiny_decoder_errors_are_one_line(tiny, tmp_path, blob, damage, message):
    assert tiny_error(tiny, tmp_path, damage(blob)) == message


@pytest.mark.parametrize("shape", [[2**32, 2**32], [2**62, 4], [-1, 8], [4, 2**40]])
def test_tiny_decoder_refuses_shapes_that_overflow(tiny, tmp_path, blob, shape):
    """np.prod wraps around at 2^64; torch refuses the shape (its words, so only the start is pinned here)."""
    message = tiny_error(tiny, tmp_path, edited(blob, _tensor("gain", shape=shape)))
    assert message.startswith("squeeze: P: malformed artifact RuntimeError(") and "\n" not in message


def test_tiny_decoder_reads_hostile_groups_and_empty_rows(tiny, tmp_path, blob):
    wide = edited(blob, _q("emb.weight", group=2**40))
    (tmp_path / "wide.sqz").write_bytes(wide)
    assert bitwise_equal(tiny.squeeze_load(str(tmp_path / "wide.sqz"))["emb.weight"], squeeze.load(blob)["emb.weight"])
    recipe = parse('[keep_float]\nmax_numel = 0\n[[rules]]\nmatch = "*"\nscheme = "int"\n', "int.toml")
    empty = squeeze.compile({"w": torch.zeros(0, 300), "v": torch.randn(4, 40)}, recipe)
    (tmp_path / "empty.sqz").write_bytes(empty)
    assert tiny.squeeze_load(str(tmp_path / "empty.sqz"))["w"].shape == (0, 300) == squeeze.load(empty)["w"].shape


def test_tiny_decoder_stays_small():
    assert len(decoder.emit(["brotli", "rans"]).encode()) < 4000


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints

class RunsAShellCommand:
    def __reduce__(self):
        return os.system, ("echo pwned > pwned.txt",)


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": {"w": torch.zeros(2)}, "extra": RunsAShellCommand()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "evil.pt")
    assert str(err.value) == (
        f"{tmp_path / 'evil.pt'}: refused, it needs unpickling of arbitrary objects (posix.system), which is unsafe; "
        f"re-save only the tensors: torch.save(model.state_dict(), path)")
    assert not (tmp_path / "pwned.txt").exists()


@pytest.mark.parametrize("write,message", [
    (lambda p: torch.save({"args": argparse.Namespace(lr=0.1), "model": {}}, p),
     "refused, it needs unpickling of arbitrary objects (argparse.Namespace), which is unsafe; re-save only the "
     "tensors: torch.save(model.state_dict(), path)"),
    (lambda p: p.write_bytes(pickle.dumps({"w": torch.zeros(2)}, protocol=4)),
     "not a readable PyTorch checkpoint (pickle opcode 149 is not allowed in a weights-only load); if it is one, "
     "re-save only the tensors: torch.save(model.state_dict(), path)"),
    (lambda p: torch.save({"step": 3}, p), "no state dict found (a dict; expected name -> tensor, or one under "
                                           "'state_dict' or 'model')"),
])
def test_unsafe_or_unusable_checkpoints(tmp_path, write, message):
    path = tmp_path / "c.pt"
    write(path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value) == f"{path}: {message}"


def test_a_damaged_safetensors_file(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", 10) + b"{not json}")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value).startswith(f"{path}: not a readable safetensors file (") and "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["", "a\nb", 3])
def test_tensor_names_must_be_printable(name):
    with pytest.raises(CheckpointError) as err:
        entries_from_state_dict({name: torch.zeros(2)})
    assert str(err.value) == f"{name!r}: a tensor name must be a non-empty printable string"


# ---------------------------------------------------------------------------------------------------------------
# Compile: values a scheme cannot hold, and atomic output

def invoke(*args):
    return CliRunner().invoke(cli.main, list(map(str, args)))


def one_line_error(result) -> str:
    assert result.exit_code == 2 and result.stdout == "", (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and isinstance(result.exception, (SystemExit, type(None))), result.stderr
    return lines[0]


def test_a_value_beyond_fp16_is_reported_and_the_hint_works(tmp_path):
    sd = {"gain": torch.tensor([1e5, 2.0]), "w": torch.randn(300, 300)}
    torch.save(sd, tmp_path / "big.pt")
    line = one_line_error(invoke("compile", tmp_path / "big.pt", "-o", tmp_path / "m.sqz"))
    assert line == ('squeeze: error: gain: 1 value(s) exceed the range of f16 (largest magnitude 100000); keep it '
                    'fp32 with a recipe rule: match = "gain", scheme = "float", float_dtype = "fp32"')
    assert not (tmp_path / "m.sqz").exists()
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[rules]]\nmatch = "gain"\nscheme = "float"\nfloat_dtype = "fp32"\n')
    assert invoke("compile", tmp_path / "big.pt", "--recipe", recipe, "-o", tmp_path / "m.sqz").exit_code == 0
    assert squeeze.load(tmp_path / "m.sqz")["gain"].tolist() == [1e5, 2.0]


def test_a_scale_beyond_fp16_reaches_the_cli_as_one_line(tmp_path):
    torch.save({"w": torch.randn(300, 300) * 1e6}, tmp_path / "huge.pt")
    line = one_line_error(invoke("compile", tmp_path / "huge.pt", "-o", tmp_path / "m.sqz"))
    assert line == 'squeeze: error: w: a scale exceeds the range of f16; use scale_dtype = "f32"'


def test_write_atomically_never_leaves_a_partial_or_wrong_file(tmp_path, monkeypatch):
    target = tmp_path / "model.sqz"
    target.write_bytes(b"precious")

    def refuse(path):
        raise FormatError(f"{path}: damaged")

    with pytest.raises(SqueezeError, match=rf"^{re.escape(str(target))} \(re-read before writing\): damaged$"):
        cli.write_atomically(str(target), b"new bytes", check=refuse)
    assert target.read_bytes() == b"precious" and sorted(os.listdir(tmp_path)) == ["model.sqz"]

    def crash(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError):
        cli.write_atomically(str(target), b"new bytes")
    assert target.read_bytes() == b"precious" and sorted(os.listdir(tmp_path)) == ["model.sqz"]
    monkeypatch.undo()
    cli.write_atomically(str(target), b"new bytes", check=lambda p: None)
    assert target.read_bytes() == b"new bytes" and sorted(os.listdir(tmp_path)) == ["model.sqz"]


def test_compile_keeps_the_old_output_when_the_new_one_does_not_read_back(tmp_path, monkeypatch, blob):
    torch.save(small_state_dict(), tmp_path / "m.pt")
    out = tmp_path / "m.sqz"
    out.write_bytes(b"precious")
    real = cli.compile_state_dict

    def compile_damaged(*args, **kwargs):
        result = real(*args, **kwargs)
        damaged = bytearray(result.blob)
        damaged[-1] ^= 1
        return type(result)(blob=bytes(damaged), state=result.state)

    monkeypatch.setattr(cli, "compile_state_dict", compile_damaged)
    recipe = tmp_path / "t.toml"
    recipe.write_text('[defaults]\nbits = 6\ncodec = "zlib"\n[keep_float]\nmax_numel = 64\n')
    line = one_line_error(invoke("compile", tmp_path / "m.pt", "--recipe", recipe, "-o", out))
    # the check reads a temporary file, but the line names the output the user asked for
    assert line == f"squeeze: error: {out} (re-read before writing): section 5 (raw.bool): checksum mismatch " \
                   f"(the file is damaged)", line
    assert out.read_bytes() == b"precious" and sorted(os.listdir(tmp_path)) == ["m.pt", "m.sqz", "t.toml"]
