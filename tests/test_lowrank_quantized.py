"""Quantized low-rank factors (format 1.4, squeeze/factors.py, passes/lowrank.py): hand-derived golden bytes, the
version rules, the reader's checks, the tiny decoder, and on the fixture a lower layer loss for about a quarter of
the f16 factors' bytes, and the allocator's pricing of them."""
import json
import zlib

import pytest
import torch

import squeeze
from squeeze import decoder, factors, format, quant
from squeeze.codecs import EncodeParams
from squeeze.errors import FormatError
from squeeze.passes import allocate, gptq
from squeeze.recipe import RecipeError, parse

from test_decoder import emitted_load, assert_same
from test_lowrank import HAND_SECTIONS, INT3, calibration  # noqa: F401 (a fixture)
from test_gptq import CALIB_TEXT, HELDOUT_TEXT, text_loss

# The 1.2 hand file's tensor (codes [[1, 0], [0, 1]], f16 row scales [1, 0.5]) with a rank-1 correction whose
# factors are quantized: U int2, codes [1, -1], scale 2 -> U = [2, -2]; V int4, codes [3, -2], one scale per row
# (lgroup 0) 0.25 -> V = [0.75, -0.5]. By hand (FORMAT.md): q·scale = [[1, 0], [0, 0.5]];
# + U ⊗ V = [[1.5, -1], [-1.5, 1]] -> [[2.5, -1], [-1.5, 1.5]].
# The part: U's codes 01 ff, V's codes 03 fe, U's scale 2.0 (f16 0x4000), V's scale 0.25 (f16 0x3400).
Q_SECTIONS = HAND_SECTIONS[:2] + [bytes.fromhex("01ff03fe00400034")]
Q_RESULT = [[2.5, -1.0], [-1.5, 1.5]]


def q_header(**q_extra) -> dict:
    q = {"bits": 8, "group": 0, "pack": "byte", "sdtype": "f16", "clip": "absmax", "rank": 1, "ldtype": "i8",
         "lbits": [2, 4], "lgroup": 0, "lsdtype": "f16"}
    q.update(q_extra)
    sections = [{"name": n, "codec": "raw", "size": len(b), "raw": len(b), "crc": zlib.crc32(b), "shuffle": 1}
                for n, b in zip(("codes", "scales.f16", "lowrank.q"), Q_SECTIONS)]
    tensor = {"name": "w", "shape": [2, 2], "dtype": "f32", "role": "other", "q": q,
              "codes": [0, 0, 4], "scales": [1, 0, 4], "lowrank": [2, 0, 8]}
    return {"sections": sections, "tensors": [tensor], "meta": {}}


def q_blob(header=None, sections=None) -> bytes:
    header, sections = header or q_header(), sections or Q_SECTIONS
    for s, b in zip(header["sections"], sections):
        s["crc"] = zlib.crc32(b)
    return format.write(header, sections, "raw", EncodeParams())


def test_hand_derived_reconstruction_and_version_byte():
    blob = q_blob()
    raw_header = json.dumps(q_header(), separators=(",", ":")).encode()
    assert blob[:8] == b"SQZ\x00\x01\x04\x00\x00" and blob[20:20 + len(raw_header)] == raw_header  # minor 4
    assert blob[20 + len(raw_header):] == b"".join(Q_SECTIONS)
    assert squeeze.load(blob)["w"].tolist() == Q_RESULT


def test_writer_makes_the_same_bytes_from_the_factors():
    f = factors.QuantizedFactors(torch.tensor([[1, -1]], dtype=torch.int8), torch.tensor([[3, -2]], dtype=torch.int8),
                                 torch.tensor([2.0]).half(), torch.tensor([[0.25]]).half(), 2, 4, 0)
    assert f.to_bytes() == Q_SECTIONS[2] and f.nbytes == 8
    assert f.header() == {"rank": 1, "ldtype": "i8", "lbits": [2, 4], "lgroup": 0, "lsdtype": "f16"}
    u, v = f.matrices()
    assert u.tolist() == [[2.0], [-2.0]] and v.tolist() == [[0.75, -0.5]]


def test_quantized_factors_in_a_1_3_file_are_refused():
    blob = bytearray(q_blob())
    blob[5] = 3
    with pytest.raises(FormatError, match=r"^artifact: tensor w: quantized low-rank factors is a format 1.4 "
                                          r"feature, the file declares 1.3$"):
        squeeze.load(bytes(blob))


@pytest.mark.parametrize("edit, message", [
    (lambda h: h["tensors"][0]["q"].pop("lbits"), "need 'lbits', 'lgroup' and 'lsdtype'"),
    (lambda h: h["tensors"][0]["q"].update(lbits=[1, 4]), "'lbits' must be a list of two integers in 2..8"),
    (lambda h: h["tensors"][0]["q"].update(lbits=4), "'lbits' must be a list of two integers in 2..8"),
    (lambda h: h["tensors"][0]["q"].update(lgroup=-1), "'lgroup' must be an integer >= 0"),
    (lambda h: h["tensors"][0]["q"].update(lsdtype="i8"), "'lsdtype' must be one of f16, bf16, f32"),
    (lambda h: h["tensors"][0]["q"].update(ldtype="f16"), "'lbits', 'lgroup' and 'lsdtype' belong to quantized"),
    (lambda h: h["tensors"][0].update(lowrank=[2, 0, 6]), "lowrank is 6 bytes, its shape and scheme imply 8"),
])
def test_malformed_quantized_factors_are_one_line_errors(edit, message):
    header = q_header()
    edit(header)
    with pytest.raises(FormatError, match=message) as err:
        squeeze.load(q_blob(header))
    assert "\n" not in str(err.value)


def test_a_factor_code_outside_its_width_is_refused():
    sections = Q_SECTIONS[:2] + [bytes.fromhex("02ff03fe00400034")]  # U code 2 in int2 (±1)
    with pytest.raises(FormatError, match=r"^artifact: tensor w: a low-rank U code is outside ±1 \(int2\)$"):
        squeeze.load(q_blob(sections=sections))


def test_tiny_decoder_reads_1_4_and_a_1_3_decoder_refuses_it(tmp_path):
    blob = q_blob()
    assert "format 1.0-1.4" in decoder.emit_for(blob)
    assert emitted_load(tmp_path, blob)["w"].tolist() == Q_RESULT
    namespace = {}
    exec(decoder.emit(["raw"], minor=3), namespace)
    with pytest.raises(ValueError, match="not a squeeze v1.0-1.3 artifact"):
        namespace["squeeze_load"](blob)


def test_recipe_keys():
    s = parse("[defaults]\nlowrank_rank = 4\nlowrank_bits_u = 2\nlowrank_bits_v = 4\nlowrank_group = 32\n", "r.toml")
    assert s.defaults.factor_spec() == factors.FactorSpec(2, 4, 32)
    assert parse("[defaults]\nlowrank_rank = 4\n", "r.toml").defaults.factor_spec().quantized is False
    with pytest.raises(RecipeError, match="lowrank_bits_u must be 0"):
        parse("[defaults]\nlowrank_bits_u = 1\n", "bad.toml")
    budget = parse("[budget]\nlowrank_ranks = [4]\nlowrank_bits_u = 3\nlowrank_group = 0\n", "b.toml")
    assert allocate.AllocateConfig.from_recipe(budget).lowrank_spec == factors.FactorSpec(3, 4, 0)
    assert allocate.AllocateConfig.from_recipe(budget).lowrank_ranks == (4,)


QUANTIZED = INT3.replace("[keep_float]", "lowrank_bits_u = 4\nlowrank_bits_v = 4\nlowrank_group = 64\n[keep_float]")


@pytest.fixture(scope="module")
def int3_triple(fixture_sd, calibration):  # noqa: F811
    """The fixture at int3 + GPTQ: plain, with rank-16 f16 corrections, with rank-16 int4/int4 ones."""
    return [squeeze.compile_state_dict(fixture_sd, parse(text.format(rank=r), "int3.toml"),
                                       hessians=calibration.hessians)
            for text, r in ((INT3, 0), (INT3, 16), (QUANTIZED, 16))]


@pytest.mark.slow
def test_quantized_correction_lowers_every_layer_loss_for_a_fraction_of_the_bytes(int3_triple, calibration):  # noqa
    plain, f16, quantized = int3_triple
    f16_entries = {e.name: e for e in f16.state.entries}
    assert quantized.blob[5] == 4
    for e in quantized.state.entries:
        if e.name not in calibration.hessians:
            continue
        assert isinstance(e.lowrank, factors.QuantizedFactors) and "lowrank r=16 int4/int4: layer loss" in e.note
        h, (rows, cols) = calibration.hessians[e.name], e.codes.shape
        w = e.tensor.reshape(rows, cols).float()
        w_hat = quant.dequantize(e.codes, e.scales, 0, torch.float32, (rows, cols))
        corrected = gptq.layer_loss(w, quant.add_lowrank(w_hat, *e.lowrank.matrices()), h)
        assert corrected < gptq.layer_loss(w, w_hat, h)
        # int4 factors keep most of what the f16 ones remove (60%), at under a third of the bytes
        f16_loss = gptq.layer_loss(w, quant.add_lowrank(w_hat, *f16_entries[e.name].lowrank.matrices()), h)
        assert corrected < gptq.layer_loss(w, w_hat, h) - 0.6 * (gptq.layer_loss(w, w_hat, h) - f16_loss)
        # its codes at their order-0 entropy (what the rans section codes them to)
        assert allocate.factor_bytes(e.lowrank) < 0.3 * f16_entries[e.name].lowrank.nbytes
    assert len(plain.blob) < len(quantized.blob) < len(f16.blob)
    for text in (CALIB_TEXT[:8192], HELDOUT_TEXT[:8192]):
        assert text_loss(squeeze.load(quantized.blob), text) < text_loss(squeeze.load(plain.blob), text)


@pytest.mark.slow
def test_loader_and_tiny_decoder_apply_quantized_factors_bit_exactly(int3_triple, tmp_path):
    quantized = int3_triple[2]
    loaded = squeeze.load(quantized.blob)
    for e in quantized.state.entries:
        if e.lowrank is not None:
            rows, cols = e.codes.shape
            w = quant.dequantize(e.codes, e.scales, 0, torch.float32, (rows, cols))
            u = e.lowrank.u_codes.float() * e.lowrank.u_scales.float()[:, None]
            v = e.lowrank.v_codes.float() * e.lowrank.v_scales.float().repeat_interleave(64, dim=1)[:, :cols]
            for k in range(u.shape[0]):  # the format's order: one float32 multiply, one float32 add per element
                w = w + u[k][:, None] * v[k][None, :]
            assert torch.equal(loaded[e.name], w.to(loaded[e.name].dtype).reshape(e.shape))
    assert_same(emitted_load(tmp_path, quantized.blob), loaded)


def test_allocator_prices_quantized_corrections_below_f16_ones(fixture_sd, calibration):  # noqa: F811
    name = "blocks.0.mlp.fc.weight"
    entry = squeeze.compile_state_dict({name: fixture_sd[name]}, parse(INT3.format(rank=0), "x")).state.entry(name)
    hessian = calibration.hessians[name]
    p = allocate.Pricing(entry, 1.0, hessian, keep_errors=True)
    grid = p.grid(3, 2.5, 0)
    f16 = {o.rank: o for o in p.with_lowrank([grid], (4, 16), factors.FactorSpec(), None)}
    q = {o.rank: o for o in p.with_lowrank([grid], (4, 16), factors.FactorSpec(4, 4, 64), None)}
    rows, cols = p.rows, p.cols
    for r in (4, 16):
        assert f16[r].bytes - grid.bytes == 2 * r * (rows + cols)
        assert 0.1 * r * (rows + cols) < q[r].bytes - grid.bytes < 0.6 * r * (rows + cols)  # ~3 bits per code
        assert f16[r].loss < q[r].loss < grid.loss
