"""The container: golden bytes pin the layout of docs/FORMAT.md; damage is detected and named."""
import json
import struct

import pytest
import torch

import squeeze
from squeeze import compiler, format, pipeline
from squeeze.errors import FormatError
from squeeze.recipe import parse
from squeeze.state import State

from conftest import RECIPES

GOLDEN_RECIPE = 'name="golden"\n[defaults]\nbits=3\ncodec="raw"\npack="dense"\n[keep_float]\nmax_numel=2\n'
GOLDEN_PREAMBLE = "53515a00" "01" "01" "00" "00" "4d030000" "4d030000" "054ec2af"
GOLDEN_HEADER = (
    '{"sections":[{"name":"embedding.codes","codec":"raw","size":6,"raw":6,"crc":2469356080,"shuffle":1},'
    '{"name":"scales.f16","codec":"raw","size":8,"raw":8,"crc":2771497856,"shuffle":1},'
    '{"name":"float.f16","codec":"raw","size":4,"raw":4,"crc":3381655638,"shuffle":1},'
    '{"name":"raw.i64","codec":"raw","size":8,"raw":8,"crc":3954038922,"shuffle":1}],'
    '"tensors":[{"name":"emb.weight","shape":[4,4],"dtype":"f32","role":"embedding",'
    '"q":{"bits":3,"group":0,"pack":"dense","sdtype":"f16","clip":"absmax"},"codes":[0,0,6],"scales":[1,0,8]},'
    '{"name":"head.weight","shape":[4,4],"dtype":"f32","role":"other","alias":"emb.weight","t":0},'
    '{"name":"gain","shape":[2],"dtype":"f32","role":"other","store":"f16","data":[2,0,4]},'
    '{"name":"step","shape":[1],"dtype":"i64","role":"control","store":"i64","data":[3,0,8]}],'
    '"meta":{"producer":"squeeze X","recipe":"golden"}}')
# int3 dense codes of (arange(16) - 7.5) / 8 by row; 4 fp16 row scales; fp16 gain; int64 step
GOLDEN_SECTIONS = "40826863ddda" "0035ab30ab300035" "003c00b8" "0300000000000000"


def golden_state_dict():
    emb = (torch.arange(16, dtype=torch.float32).reshape(4, 4) - 7.5) / 8
    return {"emb.weight": emb, "head.weight": emb, "gain": torch.tensor([1.0, -0.5]),
            "step": torch.tensor([3], dtype=torch.int64)}


def test_golden_bytes(monkeypatch):
    monkeypatch.setattr(compiler, "__version__", "X")
    recipe = parse(GOLDEN_RECIPE, "golden.toml")
    state = pipeline.run(State(entries=compiler.entries_from_state_dict(golden_state_dict()), recipe=recipe))
    blob = format.write(compiler.header_of(state), [s.stored for s in state.sections], "raw", recipe.encode.params)
    assert blob.hex() == GOLDEN_PREAMBLE + GOLDEN_HEADER.encode().hex() + GOLDEN_SECTIONS
    out = squeeze.load(blob)
    assert list(out) == ["emb.weight", "head.weight", "gain", "step"]
    assert out["head.weight"] is out["emb.weight"]
    assert out["gain"].tolist() == [1.0, -0.5] and out["step"].tolist() == [3]
    # the compiler itself picks the smaller zlib header; the content is the same
    compiled = squeeze.compile(golden_state_dict(), recipe)
    assert len(compiled) < len(blob) and compiled[6] == 1  # header codec id 1 = zlib
    assert format.read(compiled).header == json.loads(GOLDEN_HEADER)


@pytest.fixture(scope="module")
def baseline_blob(fixture_small):
    return squeeze.compile(fixture_small, squeeze.Recipe.load(RECIPES / "int8-baseline.toml"))


@pytest.mark.slow
def test_compile_is_deterministic(fixture_sd):
    recipe = squeeze.Recipe()
    assert squeeze.compile(fixture_sd, recipe) == squeeze.compile(dict(fixture_sd), recipe)


@pytest.mark.parametrize("cut", [0, 3, 19, 25, 200, -1])
def test_truncation_is_named(baseline_blob, cut):
    art = format.read(baseline_blob)
    damaged = baseline_blob[:cut] if cut >= 0 else baseline_blob[: art.offsets[-1] + 5]
    with pytest.raises(FormatError) as err:
        squeeze.load(damaged)
    message = str(err.value)
    assert "\n" not in message
    if cut < 0:
        assert f"section {len(art.sections) - 1} ({art.sections[-1]['name']}): truncated" in message
    elif cut >= 20:
        assert "header: truncated" in message
    else:
        assert "too short" in message


def test_bit_flip_in_each_section_is_named(baseline_blob):
    art = format.read(baseline_blob)
    for i, s in enumerate(art.sections):
        pos = art.offsets[i] + s["size"] // 2
        damaged = bytearray(baseline_blob)
        damaged[pos] ^= 0x10
        with pytest.raises(FormatError, match=rf"section {i} \({s['name']}\): checksum mismatch"):
            squeeze.load(bytes(damaged))


def test_bit_flip_in_header_and_preamble(baseline_blob):
    damaged = bytearray(baseline_blob)
    damaged[30] ^= 1
    with pytest.raises(FormatError, match="header: checksum mismatch"):
        squeeze.load(bytes(damaged))
    with pytest.raises(FormatError, match="bad magic"):
        squeeze.load(b"PK\x03\x04" + baseline_blob[4:])
    with pytest.raises(FormatError, match=r"unsupported format version 2\.\d"):
        squeeze.load(baseline_blob[:4] + b"\x02" + baseline_blob[5:])
    with pytest.raises(FormatError, match="unexpected bytes after the last section"):
        squeeze.load(baseline_blob + b"\x00")


def _rewrite_header(blob: bytes, edit) -> bytes:
    art = format.read(blob)
    header = json.loads(json.dumps(art.header))
    edit(header)
    return format.write(header, [blob[o:o + s["size"]] for o, s in zip(art.offsets, art.sections)], "zlib",
                        squeeze.Recipe().encode.params)


def _tensor(header: dict, name: str) -> dict:
    return next(t for t in header["tensors"] if t["name"] == name)


def _section_of(header: dict, name: str, kind: str) -> dict:
    return header["sections"][_tensor(header, name)[kind][0]]


EMB, GAIN = "tok_emb.weight", "blocks.0.attn_scale"  # quantized (int8) and float (f16) in the baseline recipe


@pytest.mark.parametrize("edit,message", [
    (lambda h: _tensor(h, EMB).update(shape=[10**6, 10**6]), f"tensor {EMB}: codes is .* bytes, its shape"),
    (lambda h: _tensor(h, EMB).update(shape=[2**30] * 3), "too many elements"),
    (lambda h: _tensor(h, EMB)["q"].update(bits=9), "invalid quantization scheme"),
    (lambda h: _tensor(h, GAIN).update(data=[99, 0, 4]), "invalid data reference"),
    (lambda h: h["sections"][0].update(codec="gzip"), r"section 0 \(.*\): unknown codec 'gzip'"),
    (lambda h: _section_of(h, EMB, "codes").update(raw=_section_of(h, EMB, "codes")["raw"] + 1), "parts cover"),
    (lambda h: h["tensors"].append(dict(h["tensors"][0])), "duplicate name"),
    (lambda h: h["tensors"].append({"name": "x", "shape": [1], "dtype": "f32", "role": "other", "alias": "nope",
                                    "t": 0}), "alias target 'nope'"),
])
def test_header_fields_out_of_range(baseline_blob, edit, message):
    with pytest.raises(FormatError, match=message):
        squeeze.load(_rewrite_header(baseline_blob, edit))


def test_preamble_layout(baseline_blob):
    magic, major, minor, codec_id, reserved, size, raw, crc = struct.unpack_from("<4sBBBBIII", baseline_blob)
    assert (magic, major, minor, reserved) == (b"SQZ\x00", 1, 1, 0)
    assert crc == format.crc32(baseline_blob[20:20 + size])
