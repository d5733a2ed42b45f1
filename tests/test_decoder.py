"""The emitted tiny decoder and squeeze.load agree bit for bit, on every codec, bit width and layout."""
import importlib.util
import re

import pytest
import torch
from click.testing import CliRunner

import squeeze
from squeeze import codecs, decoder, format
from squeeze.cli import main
from squeeze.recipe import parse

from conftest import RECIPES, bitwise_equal

FAST_ENCODE = "[encode]\nbrotli_quality = 5\nzstd_level = 3\nlzma_preset = 1\nlzma_extreme = false\n"


@pytest.fixture(scope="module")
def mixed_sd(fixture_sd):
    """Real fixture tensors in every dtype the format holds, plus aliases."""
    fc = fixture_sd["blocks.0.mlp.fc.weight"]
    return {
        "tok_emb.weight": fixture_sd["tok_emb.weight"],                      # bf16
        "blocks.0.mlp.fc.weight": fc,                                        # f32, groups of 64
        "blocks.0.attn.c_q.weight": fixture_sd["blocks.0.attn.c_q.weight"].half(),   # f16
        "blocks.0.attn.c_k.weight": fixture_sd["blocks.0.attn.c_k.weight"].double(),  # f64
        "blocks.0.attn_scale": fixture_sd["blocks.0.attn_scale"],            # control, kept f32
        "skip_weights": fixture_sd["skip_weights"],
        "step": torch.tensor([1234], dtype=torch.int64),
        "mask": fixture_sd["blocks.0.resid_mix"] > 0.5,
        "lm_head.weight": fixture_sd["tok_emb.weight"],                       # alias
        "fc_t.weight": fc.t().contiguous(),                                  # transposed alias
    }


def emitted_load(tmp_path, blob: bytes, emit_from: bytes | None = None) -> dict:
    """Emit a decoder for `emit_from` (default: `blob`), import it as a module and load `blob` with it: from the path
    and as bytes, bytearray and memoryview, all bit for bit the same (returns the path's)."""
    (tmp_path / "model.sqz").write_bytes(blob)
    src = tmp_path / "decode.py"
    src.write_text(decoder.emit_for(emit_from or blob))
    spec = importlib.util.spec_from_file_location(f"decode_{id(blob)}", src)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert [n for n in vars(module) if not n.startswith("__")] == [decoder.NAME]
    out = module.squeeze_load(str(tmp_path / "model.sqz"))
    for form in (bytes, bytearray, memoryview):
        assert_same(module.squeeze_load(form(blob)), out)
    return out


def assert_same(a: dict, b: dict):
    assert list(a) == list(b)
    for name in a:
        assert bitwise_equal(a[name], b[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("codec", codecs.NAMES)
@pytest.mark.parametrize("bits", range(2, 9))
def test_emitted_decoder_equals_library(tmp_path, mixed_sd, codec, bits):
    recipe = parse(f'[defaults]\nbits = {bits}\ncodec = "{codec}"\nclip = "mse"\nmse_grid = 4\n'
                   f'[keep_float]\nmax_numel = 1000\n'
                   f'[[rules]]\nmatch = "*.mlp.*"\ngroup_size = 64\npack = "byte"\n'
                   f'[[rules]]\nmatch = "*.c_q.*"\npack = "dense"\nscale_dtype = "fp32"\n' + FAST_ENCODE, "t.toml")
    blob = squeeze.compile(mixed_sd, recipe)
    lib = squeeze.load(blob)
    assert_same(emitted_load(tmp_path, blob), lib)
    assert lib["mask"].dtype == torch.bool and lib["step"].item() == 1234
    assert lib["blocks.0.attn.c_k.weight"].dtype == torch.float64


@pytest.mark.slow
def test_decoder_is_tiny_for_int_n_brotli(tmp_path, fixture_sd):
    blob = squeeze.compile(fixture_sd)  # default recipe: int6/int8 + brotli
    source = decoder.emit_for(blob)
    assert "brotli" in source and "lzma" not in source and "zstandard" not in source
    assert "lowrank" not in source and "stack" not in source and "float8" not in source  # a 1.1 file
    assert len(source.encode()) <= 4000
    assert_same(emitted_load(tmp_path, blob), squeeze.load(blob))


def test_decoder_for_the_baseline_recipe_needs_only_zlib(tmp_path, fixture_sd):
    blob = squeeze.compile(fixture_sd, squeeze.Recipe.load(RECIPES / "int8-baseline.toml"))
    source = decoder.emit_for(blob)
    assert "brotli" not in source
    assert_same(emitted_load(tmp_path, blob), squeeze.load(blob))


def test_emitted_decoder_rejects_damage(tmp_path, fixture_small):
    good = squeeze.compile(fixture_small)
    blob = bytearray(good)
    blob[-3] ^= 0xFF
    # emit-decoder refuses a damaged artifact, so the decoder comes from the good one, as a user's would
    with pytest.raises(ValueError, match="checksum mismatch"):
        emitted_load(tmp_path, bytes(blob), emit_from=good)


# ---------------------------------------------------------------------------------------------------------------
# As shipped: one name, bytes or a path, the self-extracting forms, only the features the artifact uses

VARIANTS = [dict(codec_names=codecs.NAMES, minor=m, **f) for m in (1, 2, 3)
            for f in ({}, {"fp8": True}, {"lowrank": False}, {"stack": False, "lowrank": False})]


@pytest.mark.parametrize("how", decoder.WRAPS)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"1.{v['minor']}-" + "-".join(
    f"{k}{int(v[k])}" for k in ("fp8", "lowrank", "stack") if k in v))
def test_the_decoder_binds_one_name(variant, how):
    """Exec'd into a script's namespace, the decoder (plain or wrapped) adds squeeze_load and changes nothing else,
    and it does not read the script's names either."""
    source = decoder.wrap(decoder.emit(**variant), how)
    taken = {k: object() for k in ("E", "T", "A", "X", "L", "Q", "D", "C", "V", "R", "P", "load", "np", "torch",
                                   "json", "zlib", "brotli", "lzma", "base64", "p", "f")}
    namespace = dict(taken)
    exec(source, namespace)
    assert set(namespace) == set(taken) | {"__builtins__", decoder.NAME}
    assert all(namespace[k] is v for k, v in taken.items())
    bare = {}
    exec(source, bare)
    assert set(bare) == {"__builtins__", decoder.NAME}


@pytest.fixture(scope="module")
def brotli_rans(fixture_small):
    return squeeze.compile(fixture_small)  # the default recipe: rans codes, brotli floats and scales


def test_load_from_bytes_equals_load_from_a_path(tmp_path, brotli_rans):
    assert {s["codec"] for s in format.read(brotli_rans).sections} == {"rans", "brotli"}
    lib = squeeze.load(brotli_rans)
    assert_same(emitted_load(tmp_path, brotli_rans), lib)  # path, bytes, bytearray, memoryview
    namespace = {}
    exec(decoder.emit_for(brotli_rans), namespace)
    assert_same(namespace["squeeze_load"](tmp_path / "model.sqz"), lib)  # a pathlib.Path too
    with pytest.raises(ValueError, match=r"^squeeze: <bytes>: section '.*' checksum mismatch$"):
        namespace["squeeze_load"](brotli_rans[:-1] + bytes([brotli_rans[-1] ^ 1]))
    with pytest.raises(ValueError, match=r"^squeeze: <bytes>: not a squeeze v1.0-1.1 artifact$"):
        namespace["squeeze_load"](b"")
    with pytest.raises(FileNotFoundError):  # OSError from open() as is
        namespace["squeeze_load"](str(tmp_path / "none.sqz"))


@pytest.mark.parametrize("how", ["lzma", "brotli"])
def test_wrapped_decoder_is_the_same_decoder(tmp_path, brotli_rans, how):
    plain = decoder.emit_for(brotli_rans)
    wrapped = decoder.emit_for(brotli_rans, wrap=how)
    assert wrapped == decoder.wrap(plain, how) and wrapped.endswith("\n") and wrapped.count("\n") == 1
    assert len(wrapped.encode()) < 0.75 * len(plain.encode())
    assert re.fullmatch(r'exec\(__import__\("%s"\)\.decompress\(__import__\("base64"\)\.b85decode\("[^"\\]+"\)'
                        r'(,3,None,\[\{"id":33\}\])?\)\)\n' % how, wrapped)
    compiled = {}
    exec(wrapped, compiled)
    assert compiled[decoder.NAME].__code__.co_code == _plain_function(plain).__code__.co_code
    assert_same(compiled[decoder.NAME](brotli_rans), squeeze.load(brotli_rans))


def _plain_function(source):
    namespace = {}
    exec(source, namespace)
    return namespace[decoder.NAME]


@pytest.mark.parametrize("how", decoder.WRAPS)
def test_emit_decoder_prints_the_counted_bytes(tmp_path, brotli_rans, how):
    (tmp_path / "m.sqz").write_bytes(brotli_rans)
    out = tmp_path / f"decode_{how}.py"
    args = ["emit-decoder", str(tmp_path / "m.sqz"), "-o", str(out)] + ([] if how == "none" else ["--wrap", how])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    size = out.stat().st_size
    plain = len(decoder.emit_for(brotli_rans).encode())
    of = "" if how == "none" else f" ({how}+base85 of {plain:,})"
    assert result.output == f"{out}: {size:,} bytes{of}; squeeze_load(path_or_bytes) -> dict of tensors\n"
    spec = importlib.util.spec_from_file_location(f"decode_{how}", out)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert_same(module.squeeze_load(str(tmp_path / "m.sqz")), squeeze.load(brotli_rans))
    bad = CliRunner().invoke(main, ["emit-decoder", str(tmp_path / "m.sqz"), "-o", str(out), "--wrap", "zip"])
    assert bad.exit_code == 2 and "zip" in bad.output


def test_features_are_emitted_only_when_used_and_refused_by_name_otherwise(tmp_path, fixture_small):
    """A decoder carries the low-rank, stack and fp8 lines only for an artifact that uses them; a decoder reading
    1.2 or 1.3 without one refuses a file needing it, in one line that names it."""
    from test_fp8 import to_fp8
    from test_lowrank import hand_blob as lowrank_blob
    from test_stack import hand_blob as stack_blob
    fp8_blob = squeeze.compile(to_fp8(fixture_small, torch.float8_e4m3fn))
    blobs = {"lowrank": lowrank_blob(), "stack": stack_blob(), "f8": fp8_blob}
    loaders = {}
    for feature, blob in blobs.items():
        source = decoder.emit_for(blob)
        for other, needle in (("lowrank", "lowrank\"]"), ("stack", "R.pop"), ("f8", "float8")):
            assert (needle in source) == (other == feature), (feature, other)
        assert_same(_plain_function(source)(blob), squeeze.load(blob))
        art = format.read(blob)  # the same features, every codec (the blobs' codecs differ)
        loaders[feature] = _plain_function(decoder.emit(codecs.NAMES, art.minor, **decoder.features_of(art)))
    for feature, load in loaders.items():
        for other, blob in blobs.items():
            if other != feature and blob[5] <= (2 if feature == "lowrank" else 3):
                with pytest.raises(ValueError) as err:
                    load(blob)
                assert str(err.value) == f"squeeze: <bytes>: {other} not in this decoder"
                assert err.value.__suppress_context__


@pytest.mark.slow
def test_decoder_sizes(fixture_small):
    """The decoder's bytes per format feature (brotli + rans sections), plain and self-extracting."""
    sizes = {}
    for name, kwargs in {"1.1": dict(minor=1), "1.2 lowrank": dict(minor=2), "1.3 stack": dict(minor=3, lowrank=False),
                         "1.3 stack+fp8": dict(minor=3, lowrank=False, fp8=True),
                         "1.3 all": dict(minor=3, fp8=True)}.items():
        source = decoder.emit(["brotli", "rans"], **kwargs)
        sizes[name] = [len(decoder.wrap(source, how).encode()) for how in decoder.WRAPS]
    print(sizes)
    assert sizes["1.1"][0] <= 4000
    assert all(lz < 0.7 * plain and br < 0.7 * plain for plain, lz, br in sizes.values())
    assert sizes["1.1"][0] < sizes["1.3 stack"][0] < sizes["1.3 all"][0]
