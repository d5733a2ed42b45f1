"""The budget's measured prices of coarse grids (squeeze/measured.py, budget.measured_prices, budget.measure_new): the
even part of a real quantization error's loss change on the fixture, computed by hand and by EvenLoss, the weights
restored bit for bit, any split of the units giving the same figure; prices only ever raised; every coarse grid a
budget keeps priced on its measurement, and a warning when nothing could measure them."""
import pytest
import torch

import squeeze
from squeeze import budget, calibrate, measured, quant
from squeeze.data import read_shard
from squeeze.models.pgolf import GPT
from squeeze.passes import allocate
from squeeze.passes.allocate import Option
from squeeze.recipe import parse

from conftest import FIXTURES, bitwise_equal

VAL = torch.from_numpy(read_shard(FIXTURES / "val_000000.bin"))
NAME = "blocks.1.mlp.fc.weight"  # a squared-ReLU input: where int2 fails the quadratic model most
RECIPE = parse('[defaults]\nbits = 6\nclip = "std"\nclip_std_k = 6.4\n[keep_float]\nmax_numel = 4096\n'
               '[encode]\ncodec = "rans"\n[[rules]]\nmatch = "tok_emb.weight"\nbits = 8\nclip_std_k = 10.0\n', "b")


@pytest.fixture(scope="module")
def model(fixture_sd):
    return GPT.from_state_dict({k: v.float() for k, v in fixture_sd.items()}).eval()


@pytest.fixture(scope="module")
def tokens():
    return calibrate.windows_of(VAL[:8 * 257], 257, 8 * 257)  # 8 windows of 256 predicted tokens


def int2_error(w: torch.Tensor) -> torch.Tensor:
    """The error of a real int2 grid (k = 2 std, round to nearest) of `w`."""
    return quant.fake_quantize(w, quant.QuantSpec(bits=2, clip="std", clip_value=2.0)) - w


@torch.no_grad()
def loss_per_token(model, tokens) -> float:
    logits = model(tokens[:, :-1]).double()
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()))


def test_even_loss_is_the_antithetic_mean_and_restores_the_weights(model, tokens):
    w = model.state_dict()[NAME].clone()
    error = int2_error(w)
    even = measured.of_logits(model, model, tokens)({NAME: [(NAME, error)]})[NAME]
    assert bitwise_equal(model.state_dict()[NAME], w)  # the trained weights, bit for bit
    by_hand = []
    for delta in (error, -error, torch.zeros_like(error)):
        moved = GPT.from_state_dict({**model.state_dict(), NAME: w + delta}).eval()
        by_hand.append(loss_per_token(moved, tokens))
    assert even == pytest.approx((by_hand[0] + by_hand[1]) / 2 - by_hand[2], rel=1e-5)
    assert even > 0


def test_even_loss_is_the_same_for_any_split_and_order_of_its_units(model, tokens):
    errors = {NAME: [(NAME, int2_error(model.state_dict()[NAME]))]}
    whole = measured.of_logits(model, model, tokens)(errors)[NAME]
    base = measured.of_logits(model, model, tokens)
    halves = [tokens[:4], tokens[4:]]
    split = measured.EvenLoss(base.params, halves, base.loss_of)(errors)[NAME]
    swapped = measured.EvenLoss(base.params, halves[::-1], base.loss_of)(errors)[NAME]
    assert split == swapped  # summed in a canonical order: the same bits
    assert split == pytest.approx(whole, rel=1e-9)


def test_even_loss_names_a_tensor_the_model_lacks(model, tokens):
    with pytest.raises(squeeze.SqueezeError, match="nope.weight: the calibration model has no such tensor"):
        measured.of_logits(model, model, tokens)({"nope.weight": [("nope.weight", torch.zeros(2, 2))]})


def test_measured_prices_only_raise_and_carry_the_nearest_ratio_to_unmeasured_coarse_grids():
    int2 = Option(2, 2.0, 100.0, 1.0)
    int2_r1 = Option(2, 2.0, 120.0, 0.8, rank=1)
    int2_wide = Option(2, 1.5, 90.0, 1.6)
    int3 = Option(3, 2.0, 150.0, 0.3)
    f16 = Option(16, 0.0, 400.0, 0.01, keep_float=True)
    points = [int2, int2_r1, int2_wide, int3, f16]
    out = budget.measured_prices(points, {budget.option_key(int2): (1.0, 4.0)}, coarse_bits=2)
    by_key = {(o.bits, o.clip_k, o.rank, o.keep_float): o for o in out}
    assert by_key[(2, 2.0, 0, False)].loss == 4.0 and by_key[(2, 2.0, 0, False)].measured == 4.0
    assert by_key[(2, 2.0, 1, False)].loss == pytest.approx(3.2) and by_key[(2, 2.0, 1, False)].measured is None
    assert by_key[(2, 1.5, 0, False)].loss == pytest.approx(6.4)
    assert by_key[(3, 2.0, 0, False)] == int3 and by_key[(16, 0.0, 0, True)] == f16  # finer grids: the model's
    # a measurement below the model's price never lowers it, nor any other candidate's
    low = budget.measured_prices(points, {budget.option_key(int2): (1.0, 0.5)}, coarse_bits=2)
    assert [o.loss for o in low] == [o.loss for o in points] and low[0].measured == 0.5
    # measure_bits = 0: nothing is coarse
    assert budget.measured_prices(points, {budget.option_key(int2): (1.0, 4.0)}, coarse_bits=0) == points


@pytest.mark.slow
def test_budget_prices_every_coarse_grid_it_keeps_on_its_measurement(fixture_sd):
    model = GPT.from_state_dict({k: v.float() for k, v in fixture_sd.items()})
    names = budget.budget_names(fixture_sd, RECIPE)
    cal = calibrate.calibrate(model, calibrate.windows_of(VAL[:8192], 256, 8192), sensitivity_names=names)
    kwargs = dict(sensitivities=cal.sensitivities, hessians=cal.hessians)
    target = 560_000  # ~2.1 bits per parameter: int2 on several matrices
    result = squeeze.compile_to_budget(fixture_sd, RECIPE, target, even_loss=cal.even_loss, **kwargs)
    assert len(result.blob) <= target and not result.warnings
    coarse = {e.name: e for e in result.state.stored_entries()
              if e.plan is not None and e.plan.scheme == "int" and e.plan.reason.startswith("budget")
              and e.plan.quant.bits <= 2}
    assert coarse and {m["name"] for m in result.measured} == set(coarse)
    fresh = measured.of_logits(model, model, cal.even_loss.units[0])
    for m in result.measured:  # the figure is that of the error as stored (GPTQ's codes, corrections and all)
        e = coarse[m["name"]]
        w = quant.as_matrix(e.tensor)
        error = quant.dequantize(e.codes, e.scales, e.plan.quant.group, torch.float32, w.shape, e.lowrank) - w
        assert fresh({e.name: [(e.name, error)]})[e.name] == pytest.approx(m["measured"], rel=1e-9)
        assert "measured" in e.plan.reason
    assert result.blob == squeeze.compile_to_budget(fixture_sd, RECIPE, target, even_loss=cal.even_loss,
                                                    **kwargs).blob  # deterministic, measurements and all
    blind = squeeze.compile_to_budget(fixture_sd, RECIPE, target, **kwargs)
    assert len(blind.warnings) == 1 and "priced on the quadratic model alone" in blind.warnings[0]
    assert not blind.measured
    # the header's prediction counts each measured grid at the larger of its measured and modelled loss
    header = float(squeeze.format.read(result.blob).header["meta"]["predicted_loss_increase"])
    modelled = allocate.predicted_loss(result.state)
    lifted = sum(max(0.0, m["measured"] - m["predicted"]) for m in result.measured)
    assert lifted > 0 and header == pytest.approx(modelled + lifted, rel=0.02)


@pytest.mark.slow
def test_cli_budget_reports_its_measured_grids(tmp_path):
    import json

    from click.testing import CliRunner
    from squeeze.cli import main
    from conftest import CKPT
    recipe = tmp_path / "b.toml"
    recipe.write_text('[defaults]\nbits = 6\nclip = "std"\nclip_std_k = 6.4\n[keep_float]\nmax_numel = 4096\n'
                      '[encode]\ncodec = "rans"\n[[rules]]\nmatch = "tok_emb.weight"\nbits = 8\nclip_std_k = 10.0\n')
    out = tmp_path / "m.sqz"
    args = ["compile", str(CKPT), "-o", str(out), "--recipe", str(recipe), "--budget", "560000", "--calib-self", "4",
            "--calib-seq-len", "128"]
    result = CliRunner().invoke(main, args + ["--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["measured"] and not report["warnings"]
    for m in report["measured"]:
        assert m["grid"].startswith("int2 ") and m["measured"] > 0 and m["predicted"] > 0
