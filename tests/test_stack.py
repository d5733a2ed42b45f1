"""N-D weights as stacks of matrices (format 1.3, squeeze/passes/stack.py): reconstruction by hand with golden bytes,
the version rules, the reader's checks, the tiny decoder; on the fixture's trained weights in the banked layout of
the records, each slice is quantized exactly as the same matrix of the baseline layout (per-row scales, its own
Hessian and GPTQ), and compile names every matrix that got no GPTQ."""
import json
import zlib

import pytest
import torch

import squeeze
from squeeze import calibrate, compiler, decoder, format
from squeeze.codecs import EncodeParams
from squeeze.errors import FormatError, SqueezeError
from squeeze.recipe import parse

from test_decoder import emitted_load, assert_same
from test_operands import TOKENS, banked_gpt

# A [2, 2, 2] f32 stack: slice b[0] int8 codes [[1, 0], [0, 1]] with f16 row scales [1, 0.5]; slice b[1] stored f16
# [[1, 2], [3, 4]]. By hand (FORMAT.md, form 4): b = [[[1, 0], [0, 0.5]], [[1, 2], [3, 4]]].
HAND_SECTIONS = [bytes.fromhex("807f7f80"), bytes.fromhex("003c0038"), bytes.fromhex("003c004000420044")]
HAND_RESULT = [[[1.0, 0.0], [0.0, 0.5]], [[1.0, 2.0], [3.0, 4.0]]]


def hand_header() -> dict:
    sections = [{"name": n, "codec": "raw", "size": len(b), "raw": len(b), "crc": zlib.crc32(b), "shuffle": 1}
                for n, b in zip(("codes", "scales.f16", "float.f16"), HAND_SECTIONS)]
    tensors = [
        {"name": "b[0]", "shape": [2, 2], "dtype": "f32", "role": "attention",
         "q": {"bits": 8, "group": 0, "pack": "byte", "sdtype": "f16", "clip": "absmax"},
         "codes": [0, 0, 4], "scales": [1, 0, 4]},
        {"name": "b[1]", "shape": [2, 2], "dtype": "f32", "role": "attention", "store": "f16", "data": [2, 0, 8]},
        {"name": "b", "shape": [2, 2, 2], "dtype": "f32", "role": "attention", "stack": ["b[0]", "b[1]"]},
        {"name": "c", "shape": [2, 2, 2], "dtype": "f32", "role": "attention", "alias": "b", "t": 0}]
    return {"sections": sections, "tensors": tensors, "meta": {}}


def hand_blob(header=None) -> bytes:
    return format.write(header or hand_header(), HAND_SECTIONS, "raw", EncodeParams())


GOLDEN_PREAMBLE = "53515a00" "01" "03" "00" "00"  # magic, 1.3 (a stack), header codec raw, reserved


def test_hand_derived_reconstruction_golden_bytes_and_version(tmp_path):
    blob = hand_blob()
    raw_header = json.dumps(hand_header(), separators=(",", ":")).encode()
    assert blob[:8].hex() == GOLDEN_PREAMBLE
    assert blob[8:20] == len(raw_header).to_bytes(4, "little") * 2 + zlib.crc32(raw_header).to_bytes(4, "little")
    assert blob[20:] == raw_header + b"".join(HAND_SECTIONS)
    loaded = squeeze.load(blob)
    assert list(loaded) == ["b", "c"]  # slices are not tensors of the checkpoint
    assert loaded["b"].tolist() == HAND_RESULT and loaded["c"].tolist() == HAND_RESULT
    assert_same(emitted_load(tmp_path, blob), loaded)


def test_a_stack_in_a_1_2_file_is_refused():
    blob = bytearray(hand_blob())
    blob[5] = 2
    with pytest.raises(FormatError, match=r"^artifact: tensor b: a stack of matrix slices is a format 1.3 feature, "
                                          r"the file declares 1.2$"):
        squeeze.load(bytes(blob))


def _move_stack_first(h):
    h["tensors"].insert(0, h["tensors"].pop(2))


@pytest.mark.parametrize("edit, message", [
    (lambda h: h["tensors"][2].update(stack=["b[0]"]), "invalid stack .*: must be a list of the names of its 2 slices"),
    (lambda h: h["tensors"][2].update(stack="b[0]"), "invalid stack"),
    (lambda h: h["tensors"][2].update(stack=["b[0]", "b[0]"]), "slice 'b\\[0\\]' is also a slice of 'b'"),
    (lambda h: h["tensors"][2].update(stack=["b[0]", "x"]), "slice 'x' is not a tensor written before the stack"),
    (_move_stack_first, "slice 'b\\[0\\]' is not a tensor written before the stack"),
    (lambda h: h["tensors"][2].update(shape=[2, 4]), "a stack must have at least 3 dims"),
    (lambda h: h["tensors"][2].update(shape=[2, 1, 4]), "slice 'b\\[0\\]' is \\[2, 2\\] f32, the stack needs \\[1, 4\\]"),
    (lambda h: h["tensors"][2].update(dtype="f16"), "the stack needs \\[2, 2\\] f16"),
    (lambda h: h["tensors"][3].update(alias="b[1]", shape=[2, 2]), "alias target 'b\\[1\\]' is a slice of 'b'"),
    (lambda h: h["tensors"][2].update(codes=[0, 0, 4]), "'codes' is no part of a tensor stored as 'stack'"),
])
def test_malformed_stacks_are_one_line_errors(edit, message):
    header = hand_header()
    edit(header)
    with pytest.raises(FormatError, match=message) as err:
        squeeze.load(hand_blob(header))
    assert "\n" not in str(err.value)


# --- the fixture's trained weights in the records' banked layout ----------------------------------------------------

INT4 = parse('[defaults]\nbits = 4\nclip = "std"\nclip_std_k = 4.0\n[keep_float]\nmax_numel = 4096\n'
             '[encode]\ncodec = "zlib"\nzlib_level = 1\n', "int4.toml")
L = 4


def baseline_name(key: str) -> str:
    """The baseline-layout name of a bank slice (fixtures/banked_gpt.py's layout)."""
    bank, i = key[:-1].split("[")
    i = int(i)
    part = {"qo_bank": ("attn.c_q", "attn.proj"), "kv_bank": ("attn.c_k", "attn.c_v"),
            "mlp_up_bank": ("mlp.fc",), "mlp_down_bank": ("mlp.proj",)}[bank]
    return f"blocks.{i % L}.{part[i // L]}.weight"


@pytest.fixture(scope="module")
def banked(fixture_sd):
    sd = banked_gpt.bank_state_dict(fixture_sd)
    model = banked_gpt.build(sd, {})
    cal = calibrate.calibrate(model, TOKENS, forward=model.forward_logits, names=list(sd))
    return sd, cal


@pytest.fixture(scope="module")
def unbanked_calibration(fixture_sd):
    from squeeze.models.pgolf import GPT
    return calibrate.calibrate(GPT.from_state_dict({k: v.float() for k, v in fixture_sd.items()}), TOKENS)


def test_bank_slices_quantize_as_the_baseline_matrices_do(tmp_path, fixture_sd, banked, unbanked_calibration):
    """Same weights, same calibration rows: every slice's codes and scales are the baseline matrix's, bit for bit
    (per-row scales per slice, GPTQ with the slice's own Hessian), and the loaded bank holds the decoded matrices."""
    sd, cal = banked
    a = squeeze.compile_state_dict(sd, INT4, hessians=cal.hessians)
    b = squeeze.compile_state_dict({k: v.float() if v.dim() == 2 else v for k, v in fixture_sd.items()}, INT4,
                                   hessians=unbanked_calibration.hessians)
    entries = {e.name: e for e in b.state.entries}
    slices = [e for e in a.state.entries if e.stack_of is not None]
    assert len(slices) == 6 * L and all(e.method_used == "gptq" for e in slices)
    for e in slices:
        ref = entries[baseline_name(e.name)]
        assert e.scales.shape == ref.scales.shape == (e.shape[0], 1)  # one scale per row of each slice
        assert torch.equal(e.codes, ref.codes) and torch.equal(e.scales, ref.scales), e.name
    loaded, ref_loaded = squeeze.load(a.blob), squeeze.load(b.blob)
    for key in [k for k in cal.hessians if "[" in k]:
        bank, i = key[:-1].split("[")
        assert torch.equal(loaded[bank][int(i)], ref_loaded[baseline_name(key)].float()), key
    assert a.blob[5] == 3 and b.blob[5] == 1
    assert_same(emitted_load(tmp_path, a.blob), loaded)


def test_stacks_without_calibration_keep_their_slices_apart(banked):
    """Round-to-nearest too: one scale per slice row (the old view, one row per bank slot, gave one per matrix)."""
    sd, _ = banked
    result = squeeze.compile_state_dict(sd, INT4)
    scales = {e.name: e.scales for e in result.state.entries if e.stack_of == "mlp_up_bank"}
    assert sorted(scales) == [f"mlp_up_bank[{i}]" for i in range(L)]
    assert all(s.shape == (512, 1) for s in scales.values())
    roles = {e.stack_of: e.role for e in result.state.entries if e.stack_of}
    assert roles == {"qo_bank": "attention", "kv_bank": "attention", "mlp_up_bank": "mlp", "mlp_down_bank": "mlp"}


@pytest.mark.slow
def test_a_rule_naming_the_bank_covers_its_slices(banked):
    sd, _ = banked
    recipe = parse('[defaults]\nbits = 4\n[keep_float]\nmax_numel = 4096\n[[rules]]\n'
                   'match = "mlp_down_bank"\nbits = 3\n', "r.toml")
    result = squeeze.compile_state_dict(sd, recipe)
    bits = {e.name: e.plan.quant.bits for e in result.state.entries if e.stack_of}
    assert {n for n, b in bits.items() if b == 3} == {f"mlp_down_bank[{i}]" for i in range(L)}


def test_every_matrix_without_gptq_is_named_with_its_reason(banked):
    """A tensor the calibration forward never multiplied by keeps round-to-nearest, and compile says so."""
    sd, cal = banked
    extra = dict(sd, unused_proj=sd["mlp_up_bank"][0].clone() * 0.5)  # in the checkpoint, not in the forward
    result = squeeze.compile_state_dict(extra, INT4, hessians=cal.hessians, calibration_skips=cal.skipped)
    methods = {m["name"]: m for m in compiler.methods_of(result.state)}
    assert methods["unused_proj"]["method"] == "rtn"
    assert methods["unused_proj"]["why"] == "no Hessian: never multiplied by in the calibration forward"
    assert sum(m["method"] == "gptq" for m in methods.values()) == len(methods) - 1
    with pytest.raises(SqueezeError, match=r"^unused_proj: no Hessian: never multiplied by in the calibration "
                                           r"forward \(--strict-calib\)$"):
        squeeze.compile_state_dict(extra, INT4, hessians=cal.hessians, strict_calib=True)


@pytest.mark.slow
def test_a_budget_compile_of_a_banked_model_prices_every_slice(banked):
    sd, cal = banked
    model = banked_gpt.build(sd, {})
    names = [n for n in calibrate.matrix_names(sd) if n.startswith("mlp_")]  # what this recipe leaves to the budget
    assert len(names) == 2 * L
    sens = calibrate.sensitivities(model, TOKENS[:2], names, forward=model.forward_logits, checkpoint_names=list(sd))
    budget = 2_300_000  # the float attention and embedding take ~2.0 MB
    recipe = parse('[defaults]\nbits = 6\n[keep_float]\nmax_numel = 4096\n[encode]\ncodec = "zlib"\n'
                   '[[rules]]\nmatch = ["qo_bank", "kv_bank", "tok_emb.weight"]\nscheme = "float"\n', "b.toml")
    result = squeeze.compile_to_budget(sd, recipe, budget, sensitivities=sens, hessians=cal.hessians)
    assert len(result.blob) <= budget
    decided = {e.name: e.plan for e in result.state.entries if e.stack_of and e.plan.reason.startswith("budget")}
    assert sorted(decided) == sorted(names)


@pytest.mark.parametrize("scheme", ["int4-row-std-f32", "int3-g64-std-bf16", "mixed-rules-float-routing"])
def test_qat_on_banks_computes_with_the_decoded_slices(banked, scheme):
    """QAT's fake-quant of a bank quantizes each slice as compile does: the weights the forward uses are the
    decoded artifact's, bit for bit; learned scales on a bank are refused by name, not mirrored wrongly."""
    from squeeze import qat
    from test_qat import bitwise_equal, recipe_of

    sd, _ = banked
    recipe = recipe_of(scheme)
    model = banked_gpt.build({k: v.clone() for k, v in sd.items()}, {})
    qat.prepare(model, recipe)
    decoded = squeeze.load(squeeze.compile(model.state_dict(), recipe))
    for bank in banked_gpt.BANKS:
        assert bitwise_equal(getattr(model, bank).detach(), decoded[bank]), bank
    with pytest.raises(ValueError, match=r"^qo_bank: learned scales are not mirrored for a stack"):
        qat.prepare(banked_gpt.build({k: v.clone() for k, v in sd.items()}, {}), recipe_of("int4-row-std-f32"),
                    learn_scales=True)


@pytest.mark.slow
def test_a_roles_table_names_what_the_name_rules_miss(banked):
    sd, _ = banked
    renamed = {("w_up" if k == "mlp_up_bank" else k): v for k, v in sd.items()}
    plain = squeeze.compile_state_dict(renamed, INT4)
    assert {e.role for e in plain.state.entries if e.stack_of == "w_up"} == {"other"}
    recipe = parse('[defaults]\nbits = 4\n[keep_float]\nmax_numel = 4096\n[roles]\nmlp = "w_up"\n'
                   '[[rules]]\nmatch = "*"\nrole = "mlp"\nbits = 3\n', "roles.toml")
    result = squeeze.compile_state_dict(renamed, recipe)
    slices = [e for e in result.state.entries if e.stack_of == "w_up"]
    assert {e.role for e in slices} == {"mlp"} and {e.plan.quant.bits for e in slices} == {3}
    with pytest.raises(squeeze.errors.RecipeError, match="unknown role 'mlps' in \\[roles\\]"):
        parse('[roles]\nmlps = "w_up"\n', "bad.toml")
