"""Sensitivities from one backward pass (squeeze/calibrate.py: fisher), on the fixture's real weights and text:
the estimator's value against a closed form, against the probe it replaces, on bank slices, and the model left as
it was."""
import importlib.util

import numpy as np
import pytest
import torch

from squeeze import calibrate, operands
from squeeze.data import read_shard
from squeeze.errors import SqueezeError
from squeeze.models.pgolf import GPT

from conftest import FIXTURES

VAL = torch.from_numpy(read_shard(FIXTURES / "val_000000.bin"))
TOKENS = calibrate.windows_of(VAL, 65, 65 * 6)  # 6 windows of 64 predictions


@pytest.fixture(scope="module")
def baseline(fixture_sd):
    return GPT.from_state_dict({k: v.float() for k, v in fixture_sd.items()}).eval()


@torch.no_grad()
def _head_rows(model) -> torch.Tensor:
    """The rows the tied head multiplies: the final norm's output on TOKENS, caught by the operand tracker."""
    rows = []
    params = calibrate.checkpoint_parameters(model)
    keep = lambda key, x: rows.append(x) if key == "tok_emb.weight" and x.shape[0] > 0 else None  # noqa: E731
    with operands.OperandTracker(params, keep, lambda *a: None):
        model(TOKENS[:, :-1])
    return rows[-1].double()  # the head's (the embedding lookup is not a product)


def test_fisher_of_a_softmax_head_equals_its_closed_form(baseline):
    """For logits = x Wᵀ the Fisher's trace over W at one token is ‖x‖²·(1 − ‖p‖²) exactly; with one token per unit
    there are no cross terms, so the estimate is the mean over tokens of ‖x‖²·‖e_y − p‖², y drawn from p. It must
    land within 4 standard deviations (computed exactly from p) of ½·mean ‖x‖²(1 − ‖p‖²)."""
    x = _head_rows(baseline)
    w = baseline.tok_emb.weight.detach().double().clone()
    got = calibrate.fisher({"head": w}, ["head"], list(x.split(1)), lambda rows: rows @ w.T)["head"]
    p = torch.softmax(x @ w.T, dim=-1)
    norm2, s = x.square().sum(1), p.square().sum(1)
    expected = 0.5 * float((norm2 * (1 - s)).mean())
    per_label = 0.5 * norm2[:, None] * (1 - 2 * p + s[:, None])  # the estimate at each token, for each label
    var = (p * per_label.square()).sum(1) - (p * per_label).sum(1).square()
    spread = float(var.sum().sqrt()) / x.shape[0]
    assert abs(got - expected) < 4 * spread, (got, expected, spread)
    assert spread < 0.05 * expected  # the test can tell a wrong estimator from a right one


def test_fisher_terms_give_the_same_bits_in_any_order_and_any_split(baseline):
    """What ranks rely on: a unit's labels are drawn from its own contents, not from its place in the sequence of
    units, and the total sums the units in a canonical order. Units reversed, or dealt to two "ranks" and joined,
    give the bits of the plain order."""
    params = calibrate.checkpoint_parameters(baseline)
    names = ["tok_emb.weight", "blocks.0.mlp.fc.weight", "blocks.1.attn.c_q.weight"]
    units = [t[:, :-1] for t in calibrate.rows_of(TOKENS)]
    plain = calibrate.fisher(params, names, units, baseline)
    assert calibrate.fisher(params, names, units[::-1], baseline) == plain
    halves = [calibrate.fisher_terms(params, names, units[r::2], baseline) for r in (1, 0)]
    assert calibrate.fisher_total(calibrate.FisherTerms.joined(halves)) == plain
    assert all(v > 0 for v in plain.values()) and len(set(plain.values())) == 3


def test_fisher_ranks_tensors_as_the_probe_does(baseline, fixture_sd):
    """On text from the model's own distribution (--calib-self) the two measures agree on the order of the tensors
    (Spearman ≥ 0.95) and on the scale (median ratio within 0.7-1.3): there the Fisher is the expected Hessian, whose
    curvature the probe samples along its noise. (On held-out text the overfit fixture is not at a minimum: the probe
    measures negative curvature for a third of its matrices and floors them, the Fisher stays positive.)"""
    names = calibrate.matrix_names(fixture_sd)
    own = calibrate.sample_sequences(baseline, 4, 65, 1024)
    fisher = calibrate.sensitivities(baseline, own, names, method="fisher")
    probe = calibrate.sensitivities(baseline, own, names, method="probe")
    a, b = np.array([fisher[n] for n in names]), np.array([probe[n] for n in names])
    ranks = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    assert np.corrcoef(ranks(a), ranks(b))[0, 1] >= 0.95
    assert 0.7 <= float(np.median(a / b)) <= 1.3


def test_fisher_is_deterministic_and_leaves_the_model_as_it_was(baseline):
    names = ["blocks.1.attn.c_q.weight", "tok_emb.weight"]
    before = {k: v.detach().clone() for k, v in baseline.state_dict().items()}
    baseline.blocks[1].attn.c_q.weight.requires_grad_(False)  # a frozen weight is measured and stays frozen
    first = calibrate.sensitivities(baseline, TOKENS[:2], names)
    second = calibrate.sensitivities(baseline, TOKENS[:2], names)
    assert first == second and all(v > 0 for v in first.values())
    assert not baseline.blocks[1].attn.c_q.weight.requires_grad
    baseline.blocks[1].attn.c_q.weight.requires_grad_(True)
    assert all(p.grad is None for p in baseline.parameters())
    for k, v in baseline.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_fisher_of_bank_slices_equals_the_baseline_layout(fixture_sd, baseline):
    """A bank slice is measured as the matrix it replaces: same forward, same drawn labels, same gradients."""
    spec = importlib.util.spec_from_file_location("banked_gpt", FIXTURES / "banked_gpt.py")
    banked_gpt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(banked_gpt)
    sd = banked_gpt.bank_state_dict(fixture_sd)
    model = banked_gpt.build(sd, {})
    banked = calibrate.sensitivities(model, TOKENS[:2], ["qo_bank[1]", "kv_bank[5]", "mlp_down_bank[2]"],
                                     forward=model.forward_logits, checkpoint_names=list(sd))
    plain = calibrate.sensitivities(baseline, TOKENS[:2], ["blocks.1.attn.c_q.weight", "blocks.1.attn.c_v.weight",
                                                           "blocks.2.mlp.proj.weight"])
    for (bank, b), (name, p) in zip(banked.items(), plain.items()):
        assert b == pytest.approx(p, rel=1e-4), (bank, name)


def test_an_unknown_sensitivity_method_is_one_line(baseline):
    with pytest.raises(SqueezeError, match=r"^sensitivities: method 'hutchinson': expected one of fisher, probe$"):
        calibrate.sensitivities(baseline, TOKENS[:1], ["tok_emb.weight"], method="hutchinson")


def test_no_tokens_is_an_error():
    w = torch.zeros(4, 4)
    with pytest.raises(SqueezeError, match="no calibration tokens"):
        calibrate.fisher({"w": w}, ["w"], [], lambda rows: rows @ w.T)
