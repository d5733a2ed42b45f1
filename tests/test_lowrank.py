"""The low-rank correction (format 1.2, squeeze/passes/lowrank.py): reconstruction by hand, the version rules, the
reader's checks, the tiny decoder, and on the fixture a lower layer loss and a lower held-out loss."""
import json
import zlib

import pytest
import torch

import squeeze
from squeeze import calibrate, decoder, format, qat, quant
from squeeze.codecs import EncodeParams
from squeeze.errors import FormatError
from squeeze.passes import allocate, gptq, lowrank
from squeeze.recipe import RecipeError, parse
from squeeze.verify.models import GPT

from test_decoder import emitted_load, assert_same
from test_gptq import CALIB_TEXT, HELDOUT_TEXT, text_loss

# A 2x2 tensor, int8 codes [[1, 0], [0, 1]], f16 row scales [1, 0.5], rank 1: U = [1, 2], V = [0.5, 0.25].
# By hand (FORMAT.md): q·scale = [[1, 0], [0, 0.5]]; + U[:, 0] ⊗ V[0, :] = [[0.5, 0.25], [1, 0.5]]
HAND_SECTIONS = [bytes.fromhex("807f7f80"), bytes.fromhex("003c0038"), bytes.fromhex("003c004000380034")]
HAND_RESULT = [[1.5, 0.25], [1.0, 1.0]]


def hand_header(**q_extra) -> dict:
    q = {"bits": 8, "group": 0, "pack": "byte", "sdtype": "f16", "clip": "absmax", "rank": 1, "ldtype": "f16"}
    q.update(q_extra)
    sections = [{"name": n, "codec": "raw", "size": len(b), "raw": len(b), "crc": zlib.crc32(b), "shuffle": 1}
                for n, b in zip(("codes", "scales.f16", "lowrank.f16"), HAND_SECTIONS)]
    tensor = {"name": "w", "shape": [2, 2], "dtype": "f32", "role": "other", "q": q,
              "codes": [0, 0, 4], "scales": [1, 0, 4], "lowrank": [2, 0, 8]}
    return {"sections": sections, "tensors": [tensor], "meta": {}}


def hand_blob(header=None) -> bytes:
    return format.write(header or hand_header(), HAND_SECTIONS, "raw", EncodeParams())


def test_hand_derived_reconstruction_and_version_byte():
    blob = hand_blob()
    raw_header = json.dumps(hand_header(), separators=(",", ":")).encode()
    # magic, major 1, minor 2 (the file uses a 1.2 feature), header codec raw, reserved, sizes, crc
    assert blob[:8] == b"SQZ\x00\x01\x02\x00\x00" and blob[20:20 + len(raw_header)] == raw_header
    assert blob[20 + len(raw_header):] == b"".join(HAND_SECTIONS)
    assert squeeze.load(blob)["w"].tolist() == HAND_RESULT


def test_files_without_a_correction_declare_1_1(fixture_small):
    blob = squeeze.compile(fixture_small, squeeze.Recipe())
    assert blob[4:6] == b"\x01\x01"
    assert format.read(blob).minor == 1


def test_a_correction_in_a_1_1_file_is_refused():
    blob = bytearray(hand_blob())
    blob[5] = 1
    with pytest.raises(FormatError, match=r"^artifact: tensor w: a low-rank correction is a format 1.2 feature, the "
                                          r"file declares 1.1$"):
        squeeze.load(bytes(blob))


@pytest.mark.parametrize("edit, message", [
    (lambda h: h["tensors"][0]["q"].pop("ldtype"), "needs 'rank' and 'ldtype' in q and a 'lowrank' part"),
    (lambda h: h["tensors"][0].pop("lowrank"), "needs 'rank' and 'ldtype' in q and a 'lowrank' part"),
    (lambda h: h["tensors"][0]["q"].update(rank=3), "'rank' must be an integer in 1..2"),
    (lambda h: h["tensors"][0]["q"].update(rank="1"), "'rank' must be an integer in 1..2"),
    (lambda h: (h["tensors"][0].update(shape=[300, 300]), h["tensors"][0]["q"].update(rank=257)),
     "'rank' must be an integer in 1..256"),
    (lambda h: h["tensors"][0]["q"].update(ldtype="u8"), "'ldtype' must be one of f16, bf16, f32, i8"),
    (lambda h: h["tensors"][0]["q"].update(ldtype="i8"), "quantized low-rank factors .* need 'lbits'"),
    (lambda h: h["tensors"][0]["q"].update(lbits=[4, 4]), "'lbits', 'lgroup' and 'lsdtype' belong to quantized"),
    (lambda h: h["tensors"][0].update(lowrank=[2, 0, 6]), "lowrank is 6 bytes, its shape and scheme imply 8"),
])
def test_malformed_corrections_are_one_line_errors(edit, message):
    header = hand_header()
    edit(header)
    with pytest.raises(FormatError, match=message) as err:
        squeeze.load(hand_blob(header))
    assert "\n" not in str(err.value)


def test_tiny_decoder_reads_1_2_and_a_1_1_decoder_refuses_it(tmp_path):
    blob = hand_blob()
    source = decoder.emit_for(blob)
    assert "format 1.0-1.2" in source
    assert emitted_load(tmp_path, blob)["w"].tolist() == HAND_RESULT
    old = tmp_path / "old.py"
    old.write_text(decoder.emit(["raw"], minor=1))
    namespace = {}
    exec(compile(old.read_text(), str(old), "exec"), namespace)
    (tmp_path / "m.sqz").write_bytes(blob)
    with pytest.raises(ValueError, match="not a squeeze v1.0-1.1 artifact"):
        namespace["squeeze_load"](str(tmp_path / "m.sqz"))


@pytest.fixture(scope="module")
def calibration(fixture_sd):
    model = GPT.from_state_dict({k: v.float() for k, v in fixture_sd.items()})
    return calibrate.calibrate(model, calibrate.windows_of(CALIB_TEXT, 256, 8192))


INT3 = ('[defaults]\nbits = 3\nclip = "std"\nclip_std_k = 4.0\ncodec = "rans"\nlowrank_rank = {rank}\n'
        '[keep_float]\nmax_numel = 4096\n')


@pytest.fixture(scope="module")
def int3_pair(fixture_sd, calibration):
    """The fixture at int3 + GPTQ, without and with rank-16 corrections."""
    return [squeeze.compile_state_dict(fixture_sd, parse(INT3.format(rank=r), "int3.toml"),
                                       hessians=calibration.hessians) for r in (0, 16)]


@pytest.mark.slow
def test_correction_lowers_every_layer_loss_and_the_held_out_loss(int3_pair, calibration):
    plain, corrected = int3_pair
    codes_of = {e.name: e.codes for e in plain.state.entries if e.codes is not None}
    for e in corrected.state.entries:
        if e.name not in calibration.hessians:
            continue
        assert torch.equal(e.codes, codes_of[e.name])  # the correction comes after GPTQ and leaves the codes alone
        assert e.lowrank is not None and "lowrank r=16: layer loss" in e.note
        h, (rows, cols) = calibration.hessians[e.name], e.codes.shape
        w = e.tensor.reshape(rows, cols).float()
        w_hat = quant.dequantize(e.codes, e.scales, 0, torch.float32, (rows, cols))
        assert gptq.layer_loss(w, quant.add_lowrank(w_hat, *e.lowrank.matrices()), h) < gptq.layer_loss(w, w_hat, h)
    for text in (CALIB_TEXT[:8192], HELDOUT_TEXT[:8192]):
        assert text_loss(squeeze.load(corrected.blob), text) < text_loss(squeeze.load(plain.blob), text)


@pytest.mark.slow
def test_loader_and_tiny_decoder_apply_the_correction_bit_exactly(int3_pair, tmp_path):
    _, corrected = int3_pair
    loaded = squeeze.load(corrected.blob)
    for e in corrected.state.entries:
        if e.lowrank is not None:
            rows, cols = e.codes.shape
            w = quant.dequantize(e.codes, e.scales, 0, torch.float32, (rows, cols)).double()
            u, v = (f.double() for f in e.lowrank.matrices())
            for k in range(u.shape[1]):  # the format's order, each step rounded to float32 as the spec says
                w = (w + (u[:, k:k + 1] * v[k:k + 1, :]).float().double()).float().double()
            assert torch.equal(loaded[e.name], w.to(loaded[e.name].dtype).reshape(e.shape))
    assert_same(emitted_load(tmp_path, corrected.blob), loaded)


def test_without_a_hessian_the_squared_error_is_what_falls(fixture_small):
    recipe = parse(INT3.format(rank=4), "int3.toml")
    result = squeeze.compile_state_dict(fixture_small, recipe)
    emb = result.state.entry("tok_emb.weight")
    assert "lowrank r=4: squared error" in emb.note
    w = emb.tensor.float()
    w_hat = quant.dequantize(emb.codes, emb.scales, 0, torch.float32, w.shape)
    assert (w - quant.add_lowrank(w_hat, *emb.lowrank.matrices())).square().sum() < (w - w_hat).square().sum()


def test_allocator_offers_corrections_on_its_hull(fixture_sd, calibration):
    name = "blocks.0.mlp.fc.weight"
    entry = squeeze.compile_state_dict({name: fixture_sd[name]}, parse(INT3.format(rank=0), "x")).state.entry(name)
    hessian = calibration.hessians[name]
    with_ranks = allocate.options_for(entry, 1.0, allocate.AllocateConfig(lowrank_ranks=(4, 8, 16, 32)), hessian)
    without = allocate.options_for(entry, 1.0, allocate.AllocateConfig(lowrank_ranks=()), hessian)
    assert all(o.rank == 0 for o in without)
    assert with_ranks != without and {o.rank for o in with_ranks} <= {0, 4, 8, 16, 32}
    # every hull is convex and falling; the corrections can only improve the trade-off
    for hull in (with_ranks, without):
        assert all(a.bytes < b.bytes and a.loss > b.loss for a, b in zip(hull, hull[1:]))
    for o in without:  # the hull with corrections, interpolated at each byte count, is never above the one without
        below = [p for p in with_ranks if p.bytes <= o.bytes]
        above = [p for p in with_ranks if p.bytes >= o.bytes]
        a, b = below[-1], (above[0] if above else below[-1])
        mixed = a.loss if b.bytes == a.bytes else a.loss + (b.loss - a.loss) * (o.bytes - a.bytes) / (b.bytes - a.bytes)
        assert mixed <= o.loss * (1 + 1e-9)


def test_recipe_and_qat_guard_the_setting(fixture_sd):
    with pytest.raises(RecipeError, match="lowrank_rank must be 0"):
        parse("[defaults]\nlowrank_rank = -1\n", "bad.toml")
    model = GPT.from_state_dict({k: v.float() for k, v in fixture_sd.items()})
    with pytest.raises(ValueError, match="QAT does not mirror it"):
        qat.prepare(model, parse('[defaults]\nmethod = "rtn"\nlowrank_rank = 4\n', "qat.toml"))


def test_column_scale_floors_dead_inputs():
    h = torch.diag(torch.tensor([4.0, 0.0, 1.0]))
    s = lowrank.column_scale(h, 3)
    assert s[0] == 2.0 and s[2] == 1.0 and 0 < s[1] < 0.01
    assert torch.equal(lowrank.column_scale(None, 3), torch.ones(3, dtype=torch.float64))
