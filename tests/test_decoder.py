"""The emitted tiny decoder and squeeze.load agree bit for bit, on every codec, bit width and layout."""
import importlib.util

import pytest
import torch

import squeeze
from squeeze import codecs, decoder
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
    """Emit a decoder for `emit_from` (default: `blob`) and load `blob` with it."""
    (tmp_path / "model.sqz").write_bytes(blob)
    src = tmp_path / "decode.py"
    src.write_text(decoder.emit_for(emit_from or blob))
    spec = importlib.util.spec_from_file_location(f"decode_{id(blob)}", src)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load(str(tmp_path / "model.sqz"))


def assert_same(a: dict, b: dict):
    assert list(a) == list(b)
    for name in a:
        assert bitwise_equal(a[name], b[name]), name


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


def test_decoder_is_tiny_for_int_n_brotli(tmp_path, fixture_sd):
    blob = squeeze.compile(fixture_sd)  # default recipe: int6/int8 + brotli
    source = decoder.emit_for(blob)
    assert "import brotli" in source and "lzma" not in source and "zstandard" not in source
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
