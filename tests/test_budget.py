"""Compile to a byte budget: the allocator's hull and greedy, budgets never exceeded, determinism, a lower loss
than one uniform grid at the same bytes on the fixture, and clear errors."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import squeeze
from squeeze import calibrate, compiler
from squeeze.data import read_shard
from squeeze.errors import SqueezeError
from squeeze.models.pgolf import GPT
from squeeze.passes import allocate as allocate_module, gptq
from squeeze.passes.allocate import Option, allocate, lower_hull
from squeeze.recipe import parse

from conftest import CKPT, FIXTURES

# attention and MLP matrices left to the budget; the embedding pinned at int8 by a rule
RECIPE = parse('[defaults]\nbits = 6\nclip = "std"\nclip_std_k = 6.4\n[keep_float]\nmax_numel = 4096\n'
               '[encode]\ncodec = "rans"\n[[rules]]\nmatch = "tok_emb.weight"\nbits = 8\nclip_std_k = 10.0\n', "b")
VAL = torch.from_numpy(read_shard(FIXTURES / "val_000000.bin"))


@st.composite
def option_sets(draw):
    n = draw(st.integers(1, 30))
    return [Option(bits=draw(st.integers(2, 8)), clip_k=1.0, bytes=draw(st.floats(1, 1e4)),
                   loss=draw(st.floats(0, 1e3))) for _ in range(n)]


@given(option_sets())
@settings(max_examples=200, deadline=None)
def test_lower_hull_is_convex_and_falling(points):
    hull = lower_hull(points)
    assert hull and hull[0].bytes == min(p.bytes for p in points)
    for a, b in zip(hull, hull[1:]):
        assert b.bytes > a.bytes and b.loss < a.loss
    for a, b, c in zip(hull, hull[1:], hull[2:]):  # loss saved per byte keeps falling
        assert (a.loss - b.loss) / (b.bytes - a.bytes) > (b.loss - c.loss) / (c.bytes - b.bytes) - 1e-9
    for p in points:  # nothing lies below the hull
        for a, b in zip(hull, hull[1:]):
            if a.bytes <= p.bytes <= b.bytes:
                t = (p.bytes - a.bytes) / (b.bytes - a.bytes)
                assert p.loss >= a.loss + t * (b.loss - a.loss) - 1e-6 * max(1.0, a.loss)


@given(st.lists(option_sets(), min_size=1, max_size=6), st.floats(0, 1))
@settings(max_examples=100, deadline=None)
def test_allocation_fits_its_pool(sets, fraction):
    options = {f"t{i}": lower_hull(s) for i, s in enumerate(sets)}
    low = sum(o[0].bytes for o in options.values())
    high = sum(o[-1].bytes for o in options.values())
    pool = low + fraction * (high - low)
    chosen = allocate(options, pool)
    assert sum(o.bytes for o in chosen.values()) <= pool + 1e-6
    with pytest.raises(SqueezeError, match="budget too small"):
        allocate(options, low * 0.99 - 1)


@pytest.fixture(scope="module")
def calibration(fixture_sd):
    model = GPT.from_state_dict({k: v.float() for k, v in fixture_sd.items()})
    names = [k for k in fixture_sd if k.startswith("blocks.") and k.endswith(".weight")]
    return calibrate.calibrate(model, calibrate.windows_of(VAL[:16384], 256, 16384), sensitivity_names=names)


@torch.no_grad()
def heldout_loss(state_dict) -> float:
    text = VAL[32768:32768 + 32 * 256 + 1]
    model = GPT.from_state_dict({k: v.float() for k, v in state_dict.items()}).eval()
    return model.loss(text[:-1].reshape(32, 256), text[1:].reshape(32, 256)).item()


@pytest.mark.slow
def test_budget_is_never_exceeded_and_beats_one_uniform_grid(fixture_sd, calibration):
    uniform = squeeze.compile(fixture_sd, RECIPE, calibration.hessians)
    sizes = []
    for budget, code in ((len(uniform), 0), (len(uniform), 20_000), (int(0.8 * len(uniform)), 4_000)):
        result = squeeze.compile_to_budget(fixture_sd, RECIPE, budget, sensitivities=calibration.sensitivities,
                                            hessians=calibration.hessians, code_bytes=code)
        assert len(result.blob) + code <= budget
        sizes.append(len(result.blob))
        if code == 0:
            same_bytes = result.blob
    assert sizes[1] < sizes[0] and sizes[2] < sizes[1]
    assert len(same_bytes) <= len(uniform)
    assert heldout_loss(squeeze.load(same_bytes)) < heldout_loss(squeeze.load(uniform))


@pytest.mark.slow
def test_budget_is_deterministic_and_says_when_too_small(fixture_sd, calibration):
    kwargs = dict(sensitivities=calibration.sensitivities, hessians=calibration.hessians)
    a = squeeze.compile_to_budget(fixture_sd, RECIPE, 800_000, **kwargs).blob
    assert a == squeeze.compile_to_budget(fixture_sd, RECIPE, 800_000, **kwargs).blob
    with pytest.raises(SqueezeError, match="budget 100,000 bytes is too small: the smallest artifact"):
        squeeze.compile_to_budget(fixture_sd, RECIPE, 100_000, **kwargs)


@pytest.mark.slow
def test_cli_budget(tmp_path):
    from click.testing import CliRunner
    from squeeze.cli import main
    out = tmp_path / "m.sqz"
    result = CliRunner().invoke(main, ["compile", str(CKPT), "-o", str(out), "--budget", "1900000",
                                       "--code-bytes", "5000", "--calib-self", "2", "--calib-seq-len", "64"])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size + 5000 <= 1_900_000
    result = CliRunner().invoke(main, ["compile", str(CKPT), "-o", str(out), "--budget", "1900000"])
    assert result.exit_code == 2 and "--budget needs calibration" in result.output


@pytest.mark.slow
def test_gptq_tensors_are_priced_on_gptq_codes(fixture_sd, calibration):
    """Where the gptq pass will refine a tensor, the allocator scores each grid on the codes GPTQ gives it: lower
    predicted loss than round-to-nearest's on the same grid, and the header's prediction of a budget compile is
    sensitivity x the output error of what is stored."""
    name = "blocks.1.mlp.fc.weight"
    entry = compiler.compile_state_dict({name: fixture_sd[name]}, RECIPE).state.entry(name)
    h, sens = calibration.hessians[name], calibration.sensitivities[name]
    rtn = allocate_module.options_for(entry, sens, allocate_module.AllocateConfig(), h)
    with_gptq = allocate_module.options_for(entry, sens, allocate_module.AllocateConfig(), h, gptq.GPTQConfig())
    rtn_by_grid = {(o.bits, o.clip_k, o.group): o for o in rtn}
    shared = [o for o in with_gptq if (o.bits, o.clip_k, o.group) in rtn_by_grid and not o.keep_float]
    assert shared and all(o.loss < rtn_by_grid[(o.bits, o.clip_k, o.group)].loss for o in shared)
    result = squeeze.compile_to_budget(fixture_sd, RECIPE, 800_000, sensitivities=calibration.sensitivities,
                                        hessians=calibration.hessians)
    predicted = float(squeeze.format.read(result.blob).header["meta"]["predicted_loss_increase"])
    assert predicted == pytest.approx(allocate_module.predicted_loss(result.state), rel=1e-3) and predicted > 0


@pytest.mark.slow
def test_budget_compile_of_a_checkpoint_with_identical_tensors(fixture_sd, calibration):
    """Untrained control tensors are often bit-identical (all ones); the tie pass aliases them before the budget
    rounds, and the rounds' own pipeline runs must take the aliases as they are."""
    sd = dict(fixture_sd)
    sd["blocks.0.attn_scale"] = torch.ones_like(sd["blocks.0.attn_scale"])
    sd["blocks.0.mlp_scale"] = torch.ones_like(sd["blocks.0.mlp_scale"])
    result = squeeze.compile_to_budget(sd, RECIPE, 900_000, sensitivities=calibration.sensitivities,
                                        hessians=calibration.hessians)
    assert len(result.blob) <= 900_000
    assert result.state.entry("blocks.0.mlp_scale").alias_of == "blocks.0.attn_scale"
    assert torch.equal(squeeze.load(result.blob)["blocks.0.mlp_scale"], sd["blocks.0.mlp_scale"])
