"""fp8 (format 1.3): float8_e4m3fn / float8_e5m2 checkpoints compile, load and decode bit-exactly; fp8 as a float
storage choice; the cast rule of docs/FORMAT.md; the version rules."""
import functools
import math

import pytest
import torch

import squeeze
from squeeze import decoder, format, loader, quant
from squeeze.checkpoint import load_checkpoint
from squeeze.dtypes import FP8_CODES, tensor_from_bytes
from squeeze.errors import CheckpointError, FormatError, RecipeError
from squeeze.recipe import parse

from conftest import RECIPES, bitwise_equal
from test_decoder import assert_same, emitted_load

FP8 = {"f8e4m3": torch.float8_e4m3fn, "f8e5m2": torch.float8_e5m2}
# every float tensor kept float, in fp8 (the control and small tensors through [keep_float])
FP8_STORE = ('name = "fp8"\n[defaults]\nscheme = "float"\nfloat_dtype = "{alias}"\n'
             '[keep_float]\ncontrol_dtype = "{alias}"\nsmall_dtype = "{alias}"\n[encode]\ncodec = "zlib"\n')


def to_fp8(sd: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def minor(blob: bytes) -> int:
    return blob[5]


# ---------------------------------------------------------------------------------------------------------------
# The cast rule, from docs/FORMAT.md's bit layouts and rounding, independently of torch

def spec_value(byte: int, code: str) -> float:
    """The value of one fp8 byte as docs/FORMAT.md lays it out."""
    sign = -1.0 if byte & 0x80 else 1.0
    ebits, mbits, bias = (4, 3, 7) if code == "f8e4m3" else (5, 2, 15)
    e, m = (byte >> mbits) & ((1 << ebits) - 1), byte & ((1 << mbits) - 1)
    if code == "f8e4m3" and byte & 0x7F == 0x7F:
        return math.nan
    if code == "f8e5m2" and e == 31:
        return sign * math.inf if m == 0 else math.nan
    if e == 0:
        return sign * m / (1 << mbits) * 2.0 ** (1 - bias)
    return sign * (1 + m / (1 << mbits)) * 2.0 ** (e - bias)


@functools.cache
def spec_finite(code: str) -> list:
    """(value, byte) of the finite non-negative fp8 values."""
    return [(spec_value(b, code), b) for b in range(0x80) if math.isfinite(spec_value(b, code))]


def spec_cast(x: float, code: str) -> int:
    """The byte docs/FORMAT.md's cast gives for a float32 value."""
    sign = 0x80 if math.copysign(1.0, x) < 0 else 0
    if math.isnan(x):
        return 0x7F | sign
    a = abs(x)
    if code == "f8e4m3" and a > 464:
        return 0x7E | sign
    if code == "f8e5m2" and a >= 61440:
        return 0x7C | sign
    best = min(spec_finite(code), key=lambda vb: (abs(vb[0] - a), vb[1] & 1))  # nearest; a tie to the even mantissa
    return best[1] | sign


@pytest.mark.parametrize("code", FP8_CODES)
def test_bit_layout_and_cast_are_as_format_md_says(code):
    every = torch.arange(256, dtype=torch.uint8)
    values = tensor_from_bytes(every.numpy().tobytes(), code, (256,)).float().tolist()
    for b, v in enumerate(values):
        want = spec_value(b, code)
        assert (math.isnan(v) and math.isnan(want)) or v == want, (code, b)
    finite = torch.tensor([v for v in values if math.isfinite(v)])
    mids = (finite.sort().values[1:] + finite.sort().values[:-1]) / 2  # every tie
    gen = torch.Generator().manual_seed(0)
    samples = torch.cat([finite, mids, mids.nextafter(mids + 1), mids.nextafter(mids - 1),
                         torch.randn(4000, generator=gen) * 2.0 ** torch.randint(-20, 18, (4000,), generator=gen),
                         torch.tensor([463.9, 464.0, 464.01, 479.9, 480.0, 1e6, 61439.0, 61440.0, 65536.0, 2.0 ** -20,
                                       -0.0, math.inf, -math.inf, math.nan])])
    got = samples.to(FP8[code]).view(torch.uint8).tolist()
    want = [spec_cast(x, code) for x in samples.tolist()]
    assert got == want


# ---------------------------------------------------------------------------------------------------------------
# fp8 checkpoints

@pytest.fixture(scope="module", params=FP8_CODES)
def baseline(request, fixture_sd):
    """(code, fp8 checkpoint, artifact compiled with the int8 baseline recipe)."""
    sd = to_fp8(fixture_sd, FP8[request.param])
    return request.param, sd, squeeze.compile(sd, squeeze.Recipe.load(RECIPES / "int8-baseline.toml"))


def test_fp8_checkpoint_compiles_and_decodes_bit_exactly(tmp_path, baseline):
    code, sd, blob = baseline
    art = format.read(blob)
    assert minor(blob) == 3 == art.minor
    out = squeeze.load(blob)
    assert list(out) == list(sd) and all(t.dtype == FP8[code] for t in out.values())
    assert_same(emitted_load(tmp_path, blob), out)
    quantized = 0
    for t in art.tensors:
        x, w = out[t["name"]], sd[t["name"]]
        if "data" in t:  # kept float: never widened to the recipe's f32/f16 (no more information), exact
            assert t["dtype"] == t["store"] == code
            assert bitwise_equal(x, w), t["name"]
            continue
        quantized += 1
        rows, cols = quant.matrix_shape(t["shape"])
        codes = loader._codes(art, t, rows, cols, t["name"])
        scales = tensor_from_bytes(art.part(t["scales"]), "f16", (rows, 1)).float()
        w_hat = quant.dequantize(codes, scales, 0, torch.float32, (rows, cols))
        assert bitwise_equal(x, w_hat.to(FP8[code]).reshape(w.shape))  # the cast of FORMAT.md
        w32 = w.float().reshape(rows, cols)
        # the int8 quantizer's error: half a step, plus what the clip cut off
        bound = scales / 2 + (w32.abs() - 127 * scales).clamp(min=0) + 1e-6
        assert ((w_hat - w32).abs() <= bound).all(), t["name"]
    assert quantized >= 8


def test_f32_artifacts_keep_declaring_1_1(fixture_small):
    blob = squeeze.compile(fixture_small, squeeze.Recipe.load(RECIPES / "int8-baseline.toml"))
    assert minor(blob) == 1


@pytest.mark.parametrize("code,alias", [("f8e4m3", "fp8e4m3"), ("f8e5m2", "f8e5m2")])
def test_fp8_storage_round_trips(tmp_path, fixture_small, code, alias):
    recipe = parse(FP8_STORE.format(alias=alias), "fp8.toml")
    # an fp8 checkpoint kept fp8: every tensor exactly
    sd = to_fp8(fixture_small, FP8[code])
    blob = squeeze.compile(sd, recipe)
    assert minor(blob) == 3
    out = squeeze.load(blob)
    assert all(t["store"] == code for t in format.read(blob).tensors if "store" in t)
    for name, w in sd.items():
        assert bitwise_equal(out[name], w), name
    assert_same(emitted_load(tmp_path, blob), out)
    # an f32/bf16 checkpoint stored fp8: each value cast once, back in its own dtype
    blob = squeeze.compile(fixture_small, recipe)
    out = squeeze.load(blob)
    for name, w in fixture_small.items():
        assert bitwise_equal(out[name], w.to(FP8[code]).to(w.dtype)), name
    assert_same(emitted_load(tmp_path, blob), out)


def test_a_1_2_file_with_an_fp8_code_is_refused(tmp_path, fixture_small):
    blob = bytearray(squeeze.compile(to_fp8(fixture_small, torch.float8_e5m2), parse(FP8_STORE.format(alias="keep"),
                                                                                    "keep.toml")))
    first = format.read(bytes(blob)).tensors[0]["name"]
    blob[5] = 2  # the preamble is outside the header CRC
    with pytest.raises(FormatError, match=rf"^artifact: tensor {first}: the fp8 dtype code f8e5m2 is a format 1\.3 "
                                          r"feature, the file declares 1\.2$"):
        squeeze.load(bytes(blob))
    # a decoder emitted for 1.2 files refuses a 1.3 file
    (tmp_path / "m.sqz").write_bytes(squeeze.compile(to_fp8(fixture_small, torch.float8_e5m2)))
    namespace = {}
    exec(decoder.emit(["brotli", "rans"], minor=2), namespace)
    with pytest.raises(ValueError, match="not a squeeze v1.0-1.2 artifact"):
        namespace["squeeze_load"](str(tmp_path / "m.sqz"))


def test_scales_and_lowrank_factors_are_never_fp8(fixture_small):
    blob = squeeze.compile({"w": fixture_small["blocks.0.mlp.fc.weight"].to(torch.float8_e4m3fn)},
                           parse("[keep_float]\nmax_numel = 0\n", "q.toml"))
    art = format.read(blob)
    header = art.header
    header["tensors"][0]["q"]["sdtype"] = "f8e4m3"
    bad = format.write(header, [blob[art.data_start:]], "zlib", squeeze.Recipe().encode.params)
    with pytest.raises(FormatError, match="'sdtype' must be one of f16, bf16, f32, got 'f8e4m3'"):
        squeeze.load(bad)
    with pytest.raises(RecipeError, match='scale_dtype = .fp8e4m3.: expected "fp16", "bf16" or "fp32"'):
        parse('[defaults]\nscale_dtype = "fp8e4m3"\n', "s.toml")
    for key in ("float_dtype", "small_dtype"):
        table = "defaults" if key == "float_dtype" else "keep_float"
        with pytest.raises(RecipeError, match=r'expected "fp16", "bf16", "fp32", "fp8e4m3", "fp8e5m2" or "keep"'):
            parse(f'[{table}]\n{key} = "fp8"\n', "f.toml")


def test_fp8_checkpoint_files_load(tmp_path, fixture_small):
    from safetensors.torch import save_file
    sd = {**to_fp8({k: v for k, v in fixture_small.items() if "mlp" in k}, torch.float8_e4m3fn),
          "skip_weights": fixture_small["skip_weights"].to(torch.float8_e5m2)}
    save_file(sd, str(tmp_path / "m.safetensors"))
    torch.save(sd, tmp_path / "m.pt")
    for path in ("m.safetensors", "m.pt"):
        got = load_checkpoint(tmp_path / path)
        assert sorted(got) == sorted(sd) and all(bitwise_equal(got[k], sd[k]) for k in sd)  # safetensors sorts
        out = squeeze.load(squeeze.compile(got))
        assert out["skip_weights"].dtype == torch.float8_e5m2
        assert out["blocks.0.mlp.fc.weight"].dtype == torch.float8_e4m3fn


def test_non_finite_fp8_values_are_refused():
    w = torch.tensor([1.0, math.nan, 2.0]).to(torch.float8_e4m3fn)
    with pytest.raises(CheckpointError, match=r"^w: 1 NaN/Inf value\(s\)"):
        squeeze.compile({"w": w})
    w = torch.tensor([1.0, math.inf, -math.inf]).to(torch.float8_e5m2)
    with pytest.raises(CheckpointError, match=r"^w: 2 NaN/Inf value\(s\)"):
        squeeze.compile({"w": w})


@pytest.mark.parametrize("code,fits,over", [("f8e4m3", 464.0, 466.0), ("f8e5m2", 61439.0, 61440.0)])
def test_fp8_storage_refuses_what_it_cannot_hold(code, fits, over):
    recipe = parse(FP8_STORE.format(alias=code), "fp8.toml")
    top = torch.finfo(FP8[code]).max
    out = squeeze.load(squeeze.compile({"w": torch.tensor([1.0, -fits, 0.5])}, recipe))
    assert out["w"].tolist() == [1.0, -top, 0.5]
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        w = torch.tensor([1.0, -over, 0.5, over], dtype=dtype)
        with pytest.raises(CheckpointError) as err:
            squeeze.compile({"w": w}, recipe)
        message = str(err.value)
        assert message.startswith(f"w: 2 value(s) exceed the range of {code} (largest magnitude ")
        assert "\n" not in message
    # e5m2 -> e4m3 narrows the range too
    if code == "f8e4m3":
        w = torch.tensor([1.0, 512.0]).to(torch.float8_e5m2)
        with pytest.raises(CheckpointError, match="1 value"):
            squeeze.compile({"w": w}, recipe)


@pytest.mark.slow
def test_fp8_decoder_lines_only_when_used(fixture_small):
    plain = decoder.emit(["brotli", "rans"], minor=3)
    fp8 = decoder.emit(["brotli", "rans"], minor=3, fp8=True)
    assert "float8" not in plain and "float8_e4m3fn" in fp8
    assert len(fp8.encode()) - len(plain.encode()) <= 40
    assert "float8" not in decoder.emit_for(squeeze.compile(fixture_small))
    assert "float8" in decoder.emit_for(squeeze.compile(to_fp8(fixture_small, torch.float8_e4m3fn)))
