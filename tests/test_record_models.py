"""fixtures/record_gpt.py: the fixture's trained weights in the layouts and matrix uses of three leaderboard records
(03-29: banks, BigramHash, value embeddings, SmearGate, XSA; 04-09: per-layer matrices, loops, skip gates, GPT-J
parallel blocks; 04-27: banks, loops, skip gates, two-lane parallel residual, sparse attention gate, smear gate), on
the fixture's real text. Calibration gives every matrix the forward multiplies by, bank slices and the tied
embedding included, the Gram of the rows that meet it; compile runs GPTQ on every quantized matrix that has one and
names the rest (lookup tables) with the reason; a budget compile through the CLI stays within its budget."""
import importlib.util
import json

import pytest
import torch
from click.testing import CliRunner

import squeeze
from squeeze import calibrate, compiler
from squeeze.cli import main
from squeeze.models.pgolf import rms_norm
from squeeze.recipe import CONTROL_PATTERNS, parse

from conftest import FIXTURES
from test_operands import TOKENS, _close_to, _gram

_spec = importlib.util.spec_from_file_location("record_gpt_fixture", FIXTURES / "record_gpt.py")
record_gpt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(record_gpt)

RECORDS = list(record_gpt.RECORDS)
L, D = 4, 256
# Every matrix over 4,096 values quantized (the fixture's attention and bank slices too); the gates, which the
# records' routing keeps float by name, quantized as well by a rule, so that GPTQ must reach them.
INT4 = parse('[defaults]\nbits = 4\nclip = "std"\nclip_std_k = 4.0\n[keep_float]\nmax_numel = 4096\n'
             '[encode]\ncodec = "zlib"\nzlib_level = 1\n'
             '[[rules]]\nmatch = ["*attn_gate_w", "smear_gate.weight"]\nscheme = "int"\nbits = 8\n', "int4.toml")
LOOKUP = "no Hessian: a lookup table (F.embedding): token ids select its rows, nothing is multiplied by it, so it " \
         "has no input Hessian"
LOOKUP_TABLES = {"03-29": {"bigram.embed.weight", "ve_shared.embed.weight"}, "04-09": set(), "04-27": set()}


@pytest.fixture(scope="module", params=RECORDS)
def variant(request, fixture_sd):
    """(record, config, state dict, model, calibration on TOKENS, INT4 compile with GPTQ)."""
    config = {"record": request.param}
    sd = record_gpt.record_state_dict(fixture_sd, config, seed=0)
    model = record_gpt.build(sd, config).eval()
    cal = calibrate.calibrate(model, TOKENS, batch_size=4, forward=model.forward_logits, names=list(sd))
    result = compiler.compile_state_dict(sd, INT4, hessians=cal.hessians, calibration_skips=cal.skipped)
    return request.param, config, sd, model, cal, result


# --- the fixture itself ----------------------------------------------------------------------------------------

def shapes(sd, names):
    return {n: tuple(sd[n].shape) for n in names}


def test_state_dict_names_and_shapes_are_the_records(fixture_sd):
    sd = record_gpt.record_state_dict(fixture_sd, {"record": "03-29"})
    banks = {"qo_bank": (8, D, D), "kv_bank": (8, 128, D), "mlp_up_bank": (L, 512, D), "mlp_down_bank": (L, D, 512)}
    assert shapes(sd, banks) == banks
    assert shapes(sd, ["bigram.embed.weight", "bigram.proj.weight", "bigram.scale", "smear.gate",
                       "ve_shared.embed.weight", "ve_shared.proj.weight", "ve_shared.scale", "ve_layer_scales.0",
                       "ve_layer_scales.1", "skip_weights"]) == {
        "bigram.embed.weight": (2048, 64), "bigram.proj.weight": (D, 64), "bigram.scale": (), "smear.gate": (D,),
        "ve_shared.embed.weight": (1024, 64), "ve_shared.proj.weight": (128, 64), "ve_shared.scale": (),
        "ve_layer_scales.0": (1,), "ve_layer_scales.1": (1,), "skip_weights": (2, D)}
    sd = record_gpt.record_state_dict(fixture_sd, {"record": "04-09"})
    assert not any(k.endswith("_bank") for k in sd)
    assert set(fixture_sd) < set(sd) and sorted(set(sd) - set(fixture_sd)) == ["skip_gates"]
    assert shapes(sd, ["skip_weights", "skip_gates"]) == {"skip_weights": (3, D), "skip_gates": (3, D)}
    sd = record_gpt.record_state_dict(fixture_sd, {"record": "04-27"})
    assert shapes(sd, banks) == banks
    assert shapes(sd, ["blocks.2.attn.attn_gate_w", "smear_gate.weight", "smear_lambda", "parallel_post_lambdas",
                       "parallel_resid_lambdas", "skip_gates"]) == {
        "blocks.2.attn.attn_gate_w": (4, 12), "smear_gate.weight": (1, 12), "smear_lambda": (1,),
        "parallel_post_lambdas": (L, 2, 2), "parallel_resid_lambdas": (L, 2), "skip_gates": (3, D)}
    again = record_gpt.record_state_dict(fixture_sd, {"record": "04-27"})
    other = record_gpt.record_state_dict(fixture_sd, {"record": "04-27"}, seed=1)
    assert all(torch.equal(sd[k], again[k]) for k in sd)
    assert not torch.equal(sd["smear_gate.weight"], other["smear_gate.weight"])


def test_layer_order_splits_as_the_records_do():
    """The top record: 11 layers, LOOP_START 3, LOOP_END 5, NUM_LOOPS 2 -> 17 passes, 8 encoder and 9 decoder."""
    enc, dec = record_gpt.layer_order(11, (3, 5, 2))
    assert enc == [0, 1, 2, 3, 4, 5, 3, 4] and dec == [5, 3, 4, 5, 6, 7, 8, 9, 10]
    assert record_gpt.layer_order(4, (1, 2, 1)) == ([0, 1, 2], [1, 2, 3])
    assert record_gpt.layer_order(4, None) == ([0, 1], [2, 3])


@torch.no_grad()
def test_without_features_it_is_the_baseline_function(fixture_sd):
    from test_operands import banked_gpt
    ids = TOKENS[:2]
    want = banked_gpt.build(banked_gpt.bank_state_dict(fixture_sd), {}).forward_logits(ids)
    for banks in (True, False):
        config = {"banks": banks}
        got = record_gpt.build(record_gpt.record_state_dict(fixture_sd, config), config).forward_logits(ids)
        assert torch.allclose(got, want, atol=1e-5, rtol=0), banks


@torch.no_grad()
def test_features_do_what_the_records_do(fixture_sd):
    # XSA: each head's output is orthogonal to its own value vector
    y, v = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 8)
    dots = (record_gpt.exclusive(y, v).reshape(2, 5, 2, 2, 8) * v.unsqueeze(3)).sum(-1)
    assert float(dots.abs().max()) < 1e-5
    # BigramHash buckets: position 0 -> the last bucket; then (36313·cur XOR 27191·prev) mod (buckets - 1)
    ids = torch.tensor([[5, 7, 1000]])
    assert record_gpt.bigram_buckets(ids, 2048).tolist() == [[2047, (36313 * 7 ^ 27191 * 5) % 2047,
                                                              (36313 * 1000 ^ 27191 * 7) % 2047]]
    # the 04-27 smear gate never smears into a BOS position: what comes before a BOS cannot change its logits
    config = {"record": "04-27"}
    model = record_gpt.build(record_gpt.record_state_dict(fixture_sd, config), config).eval()
    a, b = TOKENS[:1, :8].clone(), TOKENS[:1, :8].clone()
    a[0, 3], b[0, 3], b[0, 2] = record_gpt.BOS_ID, record_gpt.BOS_ID, (int(a[0, 2]) + 1) % 1024
    ea, eb = model.embed(a), model.embed(b)
    assert torch.equal(ea[0, 3], eb[0, 3]) and not torch.equal(ea[0, 2], eb[0, 2])


@torch.no_grad()
def test_every_variant_is_trained_enough(fixture_sd):
    """Still a language model: on real text each variant's loss stays near the trained baseline's (3.75 nats on these
    64-token windows; a unigram model: 5.95 on the val shard); 04-27's two-lane residual, a structure these weights
    never trained with, costs most. forward/forward_logits keep the records' contract."""
    from test_operands import banked_gpt
    ids = TOKENS
    base = float(banked_gpt.build(banked_gpt.bank_state_dict(fixture_sd), {})(ids[:, :-1], ids[:, 1:]))
    losses = {}
    for record in RECORDS:
        config = {"record": record}
        model = record_gpt.build(record_gpt.record_state_dict(fixture_sd, config), config).eval()
        logits = model.forward_logits(ids[:, :-1])
        assert logits.shape == (ids.shape[0], ids.shape[1] - 1, 1024) and torch.isfinite(logits).all()
        losses[record] = float(model(ids[:, :-1], ids[:, 1:]))
        with pytest.raises(TypeError):
            model(ids)  # like the records: forward needs targets
    assert max(losses.values()) < base + 1.2, (base, losses)
    assert losses["03-29"] < base + 0.5 and losses["04-09"] < base + 0.5, (base, losses)


def test_build_loads_strictly_and_checks_its_config(fixture_sd):
    sd = record_gpt.record_state_dict(fixture_sd, {"record": "03-29"})
    with pytest.raises(RuntimeError, match="ve_shared.proj.weight"):
        record_gpt.build({k: v for k, v in sd.items() if k != "ve_shared.proj.weight"}, {"record": "03-29"})
    with pytest.raises(RuntimeError, match="bigram.embed.weight"):
        record_gpt.build(sd, {"banks": True})
    with pytest.raises(ValueError, match="unknown config key"):
        record_gpt.build(sd, {"record": "03-29", "bigrams": [1, 2]})
    with pytest.raises(ValueError, match="unknown record"):
        record_gpt.build(sd, {"record": "05-01"})
    with pytest.raises(ValueError, match="goes back below parallel_start"):
        record_gpt.build(sd, {"loop": [1, 2, 2], "parallel": "lanes", "parallel_start": 2})  # decoder 2, 1, 2, 3


# --- calibration and GPTQ ----------------------------------------------------------------------------------------

def test_every_quantized_matrix_has_a_hessian_and_gets_gptq(variant):
    """Every matrix INT4 quantizes got a Hessian (each bank slice, the tied embedding, bigram and VE projections,
    the gates) and GPTQ ran on it: its codes are GPTQ's, except where round-to-nearest's were as good on the layer
    loss (some of the tiny int8 gates, 12 columns), which the report says. The only matrices without GPTQ are the
    lookup tables, named with why."""
    record, _, sd, _, cal, result = variant
    methods = {m["name"]: m for m in compiler.methods_of(result.state)}
    tables = LOOKUP_TABLES[record]
    assert set(cal.skipped) == tables and all(f"no Hessian: {cal.skipped[t]}" == LOOKUP for t in tables)
    assert all(methods[t]["method"] == "rtn" and methods[t]["why"] == LOOKUP for t in tables)
    ran = set(methods) - tables
    assert ran <= set(cal.hessians)
    assert len(ran) == {"03-29": 27, "04-09": 25, "04-27": 30}[record]  # 25: tied embedding + 6 matrices x 4 layers
    gates = {n for n in ran if "gate" in n}
    assert len(gates) == {"03-29": 0, "04-09": 0, "04-27": L + 1}[record]
    for n in gates - {n for n in ran if methods[n]["method"] == "gptq"}:
        assert methods[n]["why"].startswith("GPTQ was not better on the layer loss"), methods[n]
    assert all(methods[n]["method"] == "gptq" for n in ran - gates), {n: methods[n] for n in ran - gates}
    assert "tok_emb.weight" in ran
    if record != "04-09":
        assert sum("_bank[" in n for n in ran) == 6 * L
    new = {"03-29": ["bigram.proj.weight", "ve_shared.proj.weight"], "04-09": [],
           "04-27": ["smear_gate.weight"] + [f"blocks.{i}.attn.attn_gate_w" for i in range(L)]}[record]
    assert set(new) <= ran
    if record == "04-27":  # GPTQ's codes where they beat round-to-nearest, on the gates too
        assert sum(methods[n]["method"] == "gptq" for n in gates) >= 2
    # what has no Hessian besides the tables is only ever used elementwise: control tensors by name
    left = [n for n in calibrate.matrix_names(sd) if n not in cal.hessians and n not in tables]
    assert left and all(any(p in n for p in CONTROL_PATTERNS) for n in left), left


@torch.no_grad()
def test_projection_and_gate_hessians_are_the_grams_of_their_rows(variant):
    """By value, against rows computed directly: BigramHash's and the value embeddings' projections meet their
    tables' rows; the 04-27 gates meet the first 12 dims of the attention input (every pass of a looped layer) and
    of the raw embedding; a GPT-J parallel block's MLP meets its attention's input."""
    record, _, sd, model, cal, _ = variant
    h = cal.hessians
    if record == "03-29":
        rows = model.bigram.embed.weight[record_gpt.bigram_buckets(TOKENS, 2048)]
        assert _close_to(h["bigram.proj.weight"], _gram(rows))
        assert _close_to(h["ve_shared.proj.weight"], _gram(model.ve_shared.embed.weight[TOKENS]))
        return
    layer = 1 if record == "04-27" else 3  # 04-27: layer 1 runs twice per forward
    attn = model.blocks[layer].attn
    seen, original = [], attn.forward

    def spy(x, *rest):
        seen.append(x)
        return original(x, *rest)
    attn.forward = spy
    try:
        again = calibrate.calibrate(model, TOKENS, batch_size=4, forward=model.forward_logits, names=list(sd))
    finally:
        del attn.forward
    x = torch.cat(seen)
    assert len(seen) == (2 if record == "04-27" else 1) * 2  # passes x 2 batches
    if record == "04-27":
        assert _close_to(again.hessians["qo_bank[1]"], _gram(x))
        assert _close_to(again.hessians["blocks.1.attn.attn_gate_w"], _gram(x[..., :12]))
        assert torch.equal(again.hessians["blocks.1.attn.attn_gate_w"], h["blocks.1.attn.attn_gate_w"])
        raw = model.tok_emb.weight[TOKENS][:, 1:, :12]
        assert _close_to(h["smear_gate.weight"], _gram(raw))
    else:
        assert _close_to(h["blocks.3.attn.c_q.weight"], _gram(x))
        assert _close_to(h["blocks.3.mlp.fc.weight"], _gram(x))
        assert torch.allclose(x, rms_norm(x))  # the block's normed input: rms 1 per row (ln_scale off)


def test_gptq_lowers_the_tied_embedding_layer_loss(variant):
    """tr(ΔE H ΔEᵀ) of the decoded tied embedding, H its calibration Hessian (the final-norm rows of the head):
    GPTQ's codes against round-to-nearest's on the same scales."""
    _, _, sd, _, cal, result = variant
    e = sd["tok_emb.weight"].double()
    hess = cal.hessians["tok_emb.weight"]
    rtn = squeeze.compile_state_dict({"tok_emb.weight": sd["tok_emb.weight"]}, INT4)
    gptq_e = squeeze.load(result.blob)["tok_emb.weight"].double()
    rtn_e = squeeze.load(rtn.blob)["tok_emb.weight"].double()

    def loss(w):
        d = w - e
        return float(((d @ hess) * d).sum())
    assert loss(gptq_e) < 0.5 * loss(rtn_e)  # measured: 0.055-0.063x
    assert not torch.equal(gptq_e, rtn_e)


# --- the CLI ---------------------------------------------------------------------------------------------------

BUDGET_RECIPE = '''name = "record-budget"
[defaults]
bits = 6
clip = "std"
clip_std_k = 12.85
[keep_float]
max_numel = 4096
[encode]
codec = "zlib"
zlib_level = 1
[budget]
bits_choices = [3, 4, 6]
clip_k_choices = [6.0, 12.85]
group_choices = []
'''


@pytest.mark.slow
@pytest.mark.parametrize("record", ["03-29", "04-27"])
def test_a_budget_compile_of_a_banked_record_model_stays_within_budget(fixture_sd, tmp_path, record):
    """squeeze compile CKPT --model fixtures/record_gpt.py:build --model-config ... --calib-self N --budget B: the
    artifact is at most B bytes, every matrix with a Hessian got GPTQ (the report names the lookup tables), and the
    decoded weights load back into the model with a loss near the original's."""
    config = {"record": record}
    sd = record_gpt.record_state_dict(fixture_sd, config)
    ckpt, cfg, recipe, out = (tmp_path / n for n in ("model.pt", "model.json", "budget.toml", "model.sqz"))
    torch.save(sd, ckpt)
    cfg.write_text(json.dumps(config))
    recipe.write_text(BUDGET_RECIPE)
    budget = 1_300_000  # ~4.5-4.9 bits per parameter; all float: 4.2 MB
    result = CliRunner().invoke(main, list(map(str, [
        "compile", ckpt, "--model", f"{FIXTURES / 'record_gpt.py'}:build", "--model-config", cfg,
        "--calib-self", 2, "--calib-seq-len", 32, "--recipe", recipe, "--budget", budget, "-o", out, "--json"])))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert out.stat().st_size == report["bytes"] <= budget
    methods = {m["name"]: m for m in report["matrices"]}
    tables = LOOKUP_TABLES[record]
    assert {n for n, m in methods.items() if m["method"] != "gptq"} == tables
    assert all(methods[t]["why"] == LOOKUP for t in tables)
    assert report["calibration"]["gptq"] == report["calibration"]["quantized_matrices"] - len(tables)
    # bank slices are matrices of their own; the budget may keep one in f16 where that prices best (04-27 does)
    assert 5 * L <= sum("_bank[" in n for n in methods) <= 6 * L and "tok_emb.weight" in methods
    decoded = squeeze.load(out)
    assert set(decoded) == set(sd)
    with torch.no_grad():
        before = float(record_gpt.build(sd, config)(TOKENS[:, :-1], TOKENS[:, 1:]))
        after = float(record_gpt.build(decoded, config)(TOKENS[:, :-1], TOKENS[:, 1:]))
    assert after < before + 0.3, (before, after)  # measured: +0.06 (03-29), +0.12 (04-27)
