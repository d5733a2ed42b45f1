"""Each pass on the fixture: tie, classify, plan, quantize, pack, encode, and the pipeline's log."""
import dataclasses

import pytest
import torch

import squeeze
from squeeze import compiler, pipeline, quant
from squeeze.codecs import EncodeParams
from squeeze.passes import classify, encode, pack, plan, quantize, tie
from squeeze.recipe import Recipe, parse
from squeeze.state import State

from conftest import RECIPES, bitwise_equal


def state_of(sd, recipe=None):
    return State(entries=compiler.entries_from_state_dict(sd), recipe=recipe or squeeze.Recipe())


def run_until(sd, last, recipe=None):
    state = state_of(sd, recipe)
    for name, fn, config in pipeline.passes_for(state.recipe):
        state = fn(state, config)
        if name == last:
            return state


@pytest.mark.slow
def test_tie_finds_shared_identical_and_transposed(fixture_small):
    sd = dict(fixture_small)
    emb = sd["tok_emb.weight"]
    sd["lm_head.weight"] = emb                                   # shared storage (tied head)
    sd["copy.weight"] = emb.clone()                              # bit-identical copy (safetensors-style)
    sd["emb_t.weight"] = emb.t().contiguous()                    # transposed copy
    sd["near.weight"] = emb.clone()
    sd["near.weight"][0, 0] += 1                                 # one element differs: stored
    state = tie.run(state_of(sd))
    alias = {e.name: (e.alias_of, e.transposed) for e in state.entries if e.alias_of}
    assert alias == {"lm_head.weight": ("tok_emb.weight", False), "copy.weight": ("tok_emb.weight", False),
                     "emb_t.weight": ("tok_emb.weight", True)}
    out = squeeze.load(squeeze.compile(sd))
    assert bitwise_equal(out["emb_t.weight"], out["tok_emb.weight"].t().contiguous())
    assert not torch.equal(out["near.weight"], out["tok_emb.weight"])


def test_tie_respects_config(fixture_small):
    sd = dict(fixture_small, **{"copy.weight": fixture_small["tok_emb.weight"].clone()})
    state = tie.run(state_of(sd), tie.TieConfig(identical=False))
    assert all(e.alias_of is None for e in state.entries)


def test_classify_roles_on_fixture_names(fixture_sd):
    roles = {e.name: e.role for e in classify.run(state_of(fixture_sd)).entries}
    assert roles["tok_emb.weight"] == "embedding"
    for i in range(4):
        for m in ("c_q", "c_k", "c_v", "proj"):
            assert roles[f"blocks.{i}.attn.{m}.weight"] == "attention"
        assert roles[f"blocks.{i}.mlp.fc.weight"] == roles[f"blocks.{i}.mlp.proj.weight"] == "mlp"
        for c in ("attn_scale", "mlp_scale", "resid_mix", "attn.q_gain"):
            assert roles[f"blocks.{i}.{c}"] == "control"
    assert roles["skip_weights"] == "control"
    assert classify.role_of("decoder.norm.weight", (256,)) == "other"
    assert classify.role_of("model.layers.0.self_attn.q_proj.weight", (8, 8)) == "attention"
    assert classify.role_of("model.layers.0.mlp.down_proj.weight", (8, 8)) == "mlp"


def test_plan_follows_the_baseline_routing(fixture_sd):
    recipe = squeeze.Recipe.load(RECIPES / "int8-baseline.toml")
    plans = {e.name: e.plan for e in run_until(fixture_sd, "plan", recipe).entries}
    assert plans["blocks.0.attn_scale"].scheme == "float" and plans["blocks.0.attn_scale"].store == "f32"
    # dim 256: c_k is 128×256 and c_q 256×256 = 65,536 elements, both within the baseline's keep-float limit
    assert (plans["blocks.0.attn.c_k.weight"].scheme, plans["blocks.0.attn.c_k.weight"].store) == ("float", "f16")
    assert plans["blocks.0.attn.c_q.weight"].scheme == "float"
    assert plans["blocks.0.mlp.fc.weight"].quant.bits == 8
    assert plans["tok_emb.weight"].pack == "byte"


@pytest.mark.slow
def test_quantize_and_pack_reconstruct_what_load_returns(fixture_sd):
    state = run_until(fixture_sd, "pack", squeeze.Recipe())
    out = squeeze.load(squeeze.compile(fixture_sd))
    for e in state.stored_entries():
        if e.plan.scheme == "int":
            w_hat = quant.dequantize(e.codes, e.scales, e.plan.quant.group, e.tensor.dtype, e.shape)
            assert bitwise_equal(out[e.name], w_hat), e.name
            assert len(dict(e.parts)["codes"]) == e.numel  # byte layout for brotli
        else:
            stored = e.tensor.to(getattr(torch, {"f16": "float16", "f32": "float32"}[e.plan.store]))
            assert bitwise_equal(out[e.name], stored.to(e.tensor.dtype)), e.name


def test_dense_pack_sizes(fixture_small):
    recipe = parse('[defaults]\nbits=5\npack="dense"\ncodec="raw"\n', "t.toml")
    state = run_until(fixture_small, "pack", recipe)
    e = next(e for e in state.entries if e.name == "tok_emb.weight")
    assert len(dict(e.parts)["codes"]) == e.numel * 5 // 8


def test_encode_auto_keeps_the_smallest_candidate(fixture_small):
    state = run_until(fixture_small, "pack", parse('[defaults]\nbits=6\n', "t.toml"))
    fast = EncodeParams(zstd_level=3, brotli_quality=5, lzma_preset=1, lzma_extreme=False)
    auto = encode.run(state, encode.EncodeConfig(params=fast))
    for name in ("zlib", "zstd", "brotli", "lzma"):
        single = encode.run(state, encode.EncodeConfig(candidates=(name,), params=fast, shuffle="off"))
        for a, s in zip(auto.sections, single.sections):
            assert a.name == s.name and len(a.stored) <= len(s.stored)


def test_encode_codes_candidates_apply_to_codes_sections_only(fixture_sd):
    """[encode] codes_candidates: the codecs tried on sections of quantized codes; the other sections keep
    `candidates`. On the trained fixture rans beats brotli on every codes section (here at brotli quality 5, for
    time; at 11 too, BENCHMARKS.md "Entropy coder"), so rans alone on codes writes the bytes trying both would."""
    recipe = Recipe()
    assert recipe.encode.codes_candidates == ("rans",)
    state = run_until(fixture_sd, "pack", recipe)
    fast = EncodeParams(brotli_quality=5)
    split = encode.run(state, encode.EncodeConfig(candidates=("brotli",), codes_candidates=("rans",), params=fast))
    kinds = {s.name: {m[1] for m in s.members} for s in split.sections}
    assert {"embedding.codes", "mlp.codes"} <= set(kinds)
    for s in split.sections:
        assert s.codec == ("rans" if kinds[s.name] == {"codes"} else "brotli"), s.name
    both = encode.run(state, encode.EncodeConfig(candidates=("brotli", "rans"), params=fast))
    rans_only = encode.run(state, encode.EncodeConfig(candidates=("brotli", "rans"), codes_candidates=("rans",),
                                                      params=fast))
    assert [(s.name, s.codec, s.stored) for s in rans_only.sections] == \
        [(s.name, s.codec, s.stored) for s in both.sections]


def test_encode_memo_codes_each_distinct_section_once(fixture_small, monkeypatch):
    """EncodeConfig.memo (what a budget compile shares across its rounds): a byte compressor runs once per distinct
    section (rans and raw, cheap, every time), and the sections are the ones coded without it."""
    state = run_until(fixture_small, "pack", Recipe())
    config = encode.EncodeConfig(candidates=("brotli", "rans"), params=EncodeParams(brotli_quality=5))
    plain = encode.run(state, config)
    calls, real = [], encode._encode_one
    monkeypatch.setattr(encode, "_encode_one", lambda job: calls.append(job[0]) or real(job))
    memo = {}
    first = encode.run(state, dataclasses.replace(config, memo=memo))
    byte_jobs = [c for c in calls if c not in ("rans", "raw")]
    calls.clear()
    second = encode.run(state, dataclasses.replace(config, memo=memo))
    assert byte_jobs and all(c in ("rans", "raw") for c in calls)  # no brotli output made twice
    assert len(memo) == len(byte_jobs)
    for out in (first, second):
        assert [(s.name, s.codec, s.stored) for s in out.sections] == [(s.name, s.codec, s.stored)
                                                                         for s in plain.sections]


@pytest.mark.slow
def test_encode_groups_by_role(fixture_sd):
    # the fixture's attention matrices have <= 65,536 elements, so quantize them explicitly
    recipe = parse('[defaults]\nbits = 6\n[keep_float]\nmax_numel = 4096\n[encode]\ncodec = "brotli"\n', "r.toml")
    state = run_until(fixture_sd, "encode", recipe)
    names = [s.name for s in state.sections]
    assert {"embedding.codes", "attention.codes", "mlp.codes", "scales.f16"} <= set(names)
    assert all(e.role in s.name for s in state.sections if s.name.endswith(".codes")
               for e in map(state.entry, (m[0] for m in s.members)))
    per_tensor = encode.run(run_until(fixture_sd, "pack", recipe),
                            encode.EncodeConfig(group_by="tensor", candidates=("brotli",)))
    grouped = sum(len(s.stored) for s in state.sections)
    assert sum(len(s.stored) for s in per_tensor.sections) > grouped  # grouping compresses better


def test_pipeline_log_records_each_pass(fixture_small):
    state = pipeline.run(state_of(fixture_small))
    assert [r.name for r in state.log] == ["tie", "classify", "stack", "plan", "allocate", "quantize", "gptq", "lowrank",
                                           "pack", "encode"]
    assert state.log[0].bytes_in == sum(t.numel() * t.element_size() for t in fixture_small.values())
    assert state.log[-1].bytes_out == sum(len(s.stored) for s in state.sections) < state.log[0].bytes_in
    assert all(r.seconds >= 0 for r in state.log)


def test_passes_do_not_mutate_their_input(fixture_small):
    before = state_of(fixture_small)
    snapshot = dataclasses.replace(before)
    for _, fn, config in pipeline.passes_for(before.recipe)[:-1]:
        after = fn(before, config)
        assert before == snapshot  # a pass with nothing to do may return its input, but never changes it
        before = snapshot = after
