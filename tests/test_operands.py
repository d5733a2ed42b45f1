"""Operand-level calibration (squeeze/operands.py, squeeze/calibrate.py) on the fixture's real weights and text:
every matrix the forward multiplies by gets the Gram matrix of the rows that meet it, whatever the architecture
(nn.Linear, a tied head's F.linear, slices of 3-D banks, loops, a wrapper's prefixed names, x @ W.T), checked
against direct computations; what calibration cannot attribute is reported with its reason."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from squeeze import calibrate
from squeeze.data import read_shard
from squeeze.models.pgolf import GPT, rms_norm

from conftest import FIXTURES

VAL = torch.from_numpy(read_shard(FIXTURES / "val_000000.bin"))
TOKENS = calibrate.windows_of(VAL, 64, 64 * 6)  # 6 windows of 64 real tokens


def _banked():
    spec = importlib.util.spec_from_file_location("banked_gpt", FIXTURES / "banked_gpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


banked_gpt = _banked()


@pytest.fixture(scope="module")
def baseline(fixture_sd):
    return GPT.from_state_dict({k: v.float() for k, v in fixture_sd.items()}).eval()


@pytest.fixture(scope="module")
def baseline_calibration(baseline):
    return calibrate.calibrate(baseline, TOKENS, batch_size=4)


def _gram(rows: torch.Tensor) -> torch.Tensor:
    rows = rows.reshape(-1, rows.shape[-1]).double()
    return rows.T @ rows / rows.shape[0]


def _close_to(h: torch.Tensor, gram: torch.Tensor) -> bool:
    """Equal to float32 rounding: calibration makes each batch's Gram in float32 (squeeze/calibrate.py), so every
    entry is within ~1e-6 of the largest diagonal entry of the exact one."""
    return float((h - gram).abs().max()) <= 1e-5 * float(gram.diagonal().abs().max())


@torch.no_grad()
def _linear_inputs(model: nn.Module) -> dict:
    """{weight name: Gram of every input row}, from forward hooks on nn.Linear: the old, narrower calibration."""
    rows, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, key=f"{name}.weight": rows.setdefault(key, []).append(inp[0].reshape(
                    -1, inp[0].shape[-1]))))
    model(TOKENS)
    for h in hooks:
        h.remove()
    return {k: _gram(torch.cat(v)) for k, v in rows.items()}


def test_every_linear_hessian_equals_its_inputs_gram(baseline, baseline_calibration):
    expected = _linear_inputs(baseline)
    h = baseline_calibration.hessians
    assert set(expected) < set(h)
    for name, gram in expected.items():
        assert _close_to(h[name], gram), name


@torch.no_grad()
def test_tied_head_gets_the_final_norm_gram(baseline, baseline_calibration):
    """The head is F.linear(x, tok_emb.weight): its rows are the final-norm output, found without any hook."""
    finals = []
    x = rms_norm(baseline.tok_emb(TOKENS))
    x0, skips = x, []
    for block in baseline.blocks[: baseline.num_encoder_layers]:
        x = block(x, x0)
        skips.append(x)
    for i, block in enumerate(baseline.blocks[baseline.num_encoder_layers:]):
        if skips:
            x = x + baseline.skip_weights[i] * skips.pop()
        x = block(x, x0)
    finals.append(rms_norm(x))
    h = baseline_calibration.hessians["tok_emb.weight"]
    assert _close_to(h, _gram(finals[0]))
    assert baseline_calibration.skipped == {}


@pytest.fixture(scope="module")
def banked_sd(fixture_sd):
    return banked_gpt.bank_state_dict(fixture_sd)


def test_bank_slices_get_the_hessians_of_the_layers_they_hold(fixture_sd, banked_sd, baseline_calibration):
    """The banked re-layout of the same trained weights: slice qo_bank[i] is layer i's c_q, qo_bank[L+i] its out
    projection, ...; F.linear(x, bank[i].to(dtype)) is followed through the index and the cast."""
    model = banked_gpt.build(banked_sd, {})
    cal = calibrate.calibrate(model, TOKENS, batch_size=4, forward=model.forward_logits, names=list(banked_sd))
    ref, L = baseline_calibration.hessians, 4
    pairs = {"tok_emb.weight": "tok_emb.weight"}
    for i in range(L):
        b = f"blocks.{i}"
        pairs.update({f"qo_bank[{i}]": f"{b}.attn.c_q.weight", f"qo_bank[{L + i}]": f"{b}.attn.proj.weight",
                      f"kv_bank[{i}]": f"{b}.attn.c_k.weight", f"kv_bank[{L + i}]": f"{b}.attn.c_v.weight",
                      f"mlp_up_bank[{i}]": f"{b}.mlp.fc.weight", f"mlp_down_bank[{i}]": f"{b}.mlp.proj.weight"})
    assert sorted(cal.hessians) == sorted(pairs)
    for key, name in pairs.items():
        assert torch.allclose(cal.hessians[key], ref[name], rtol=1e-6, atol=1e-9), key


def test_a_wrapper_prefix_keeps_the_checkpoint_names(banked_sd):
    plain = banked_gpt.build(banked_sd, {})
    wrapped = banked_gpt.build(banked_sd, {"wrap": True})
    assert next(iter(dict(wrapped.named_parameters()))).startswith("model.")
    a = calibrate.calibrate(plain, TOKENS[:2], forward=plain.forward_logits, names=list(banked_sd))
    b = calibrate.calibrate(wrapped, TOKENS[:2], forward=wrapped.forward_logits, names=list(banked_sd))
    assert sorted(a.hessians) == sorted(b.hessians)
    assert all(torch.equal(a.hessians[k], b.hessians[k]) for k in a.hessians)


@torch.no_grad()
def test_a_looped_layer_sums_over_its_passes(banked_sd):
    """loops [0, 1, 3]: layer 0 runs three times per forward; its Hessians average the rows of all three passes."""
    model = banked_gpt.build(banked_sd, {"loops": [0, 1, 3]})
    rows = []
    original = model.blocks[0].forward

    def spy(x, x0, *weights):  # the attention input of every pass of layer 0 (c_q meets rms_norm of the mix)
        mix = model.blocks[0].resid_mix
        rows.append(rms_norm(mix[0] * x + mix[1] * x0))
        return original(x, x0, *weights)

    model.blocks[0].forward = spy
    cal = calibrate.calibrate(model, TOKENS[:2], forward=model.forward_logits, names=list(banked_sd))
    assert len(rows) == 3
    assert _close_to(cal.hessians["qo_bank[0]"], _gram(torch.cat(rows)))


class _Products(nn.Module):
    """Real fixture matrices used in the ways models write products."""

    def __init__(self, sd):
        super().__init__()
        self.w = nn.Parameter(sd["blocks.0.attn.c_q.weight"].float().clone())       # x @ w.T, then F.linear
        self.u = nn.Parameter(sd["blocks.1.attn.c_q.weight"].float().clone())       # u @ h (columns of h)
        self.t = nn.Parameter(sd["blocks.2.attn.c_q.weight"].float().clone())       # h @ t: its rows meet h
        self.e = nn.Parameter(sd["blocks.3.attn.c_q.weight"].float().clone())       # einsum
        self.unused = nn.Parameter(sd["blocks.0.attn.c_k.weight"].float().clone())

    def forward(self, x):
        h1 = x @ self.w.T
        h2 = F.linear(h1.bfloat16(), self.w.to(torch.bfloat16)).float()
        h3 = (self.u @ h2.mT).mT
        h4 = h3 @ self.t
        return torch.einsum("btd,ed->bte", h4, self.e)


@torch.no_grad()
def test_products_of_every_form_and_the_reasons_for_the_rest(fixture_sd, baseline):
    m = _Products(fixture_sd)
    x = rms_norm(baseline.tok_emb(TOKENS[:2]))
    hessians, skipped = calibrate.collect_hessians(m, [x])
    h1 = x @ m.w.T
    h2 = F.linear(h1.bfloat16(), m.w.to(torch.bfloat16)).float()
    assert _close_to(hessians["w"], _gram(torch.cat([x.reshape(-1, 256), h1.bfloat16().float().reshape(-1, 256)])))
    assert _close_to(hessians["u"], _gram(h2))
    assert sorted(hessians) == ["u", "w"]
    assert "rows, not its columns" in skipped["t"]
    assert "einsum" in skipped["e"]
    assert "unused" not in skipped  # never multiplied: compile names it (no Hessian, never multiplied by)


def test_sensitivities_of_slices_perturb_only_their_slice(banked_sd):
    model = banked_gpt.build(banked_sd, {})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sens = calibrate.sensitivities(model, TOKENS[:2], ["qo_bank[1]", "mlp_up_bank[3]", "tok_emb.weight"],
                                   forward=model.forward_logits, checkpoint_names=list(banked_sd), method="probe")
    assert sorted(sens) == ["mlp_up_bank[3]", "qo_bank[1]", "tok_emb.weight"]
    assert all(v > 0 for v in sens.values())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # every probe is undone exactly


# ---------------------------------------------------------------------------------------------------------------
# Sensitivities, by value: the probe measures ½·zᵀ∇²L·z per unit of noise variance, z the noise it draws

def _probe_draws(params: dict, names: list, noise: float = calibrate.PROBE_NOISE) -> dict:
    """δ/σ of each probe's noise δ: standard normal draws from one generator seeded 0, one tensor after another in
    `names` order, scaled to σ = noise·std(tensor) in float32 as probe scales them."""
    g, out = torch.Generator().manual_seed(0), {}
    for name in names:
        sigma = noise * float(params[name].detach().float().std())
        out[name] = (torch.randn(params[name].shape, generator=g) * sigma).double() / sigma
    return out


def _curvature(model: nn.Module, batch: torch.Tensor, p: torch.Tensor, z: torch.Tensor) -> float:
    """½·zᵀ∇²L·z of the next-token loss on `batch` along z in parameter p: the exact second directional derivative,
    by double backward (no finite difference)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernels have no double backward
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        grad, = torch.autograd.grad(loss, p, create_graph=True)
        hz, = torch.autograd.grad((grad * z).sum(), p)
    return 0.5 * float((hz * z).sum())


@pytest.fixture(scope="module")
def baseline64(fixture_sd):
    """The fixture model in float64: its loss differences resolve a small probe's ΔL."""
    return GPT.from_state_dict({k: v.double() for k, v in fixture_sd.items()}).double().eval()


SMOOTH = ["blocks.3.mlp.proj.weight", "blocks.3.attn.c_v.weight", "tok_emb.weight"]  # loss smooth around them
BENT = "blocks.3.mlp.fc.weight"  # its loss curves down along the probe's noise (relu² kinks follow it)


def test_sensitivities_equal_the_loss_curvature_along_the_probe_noise(baseline64):
    """The antithetic pair cancels the odd terms, so ΔL/σ² = ½·zᵀ∇²L·z + O(σ²): with a small probe on a float64 loss
    it must equal the curvature double backward computes, to 1e-3; `sensitivities` (its float32 cross-entropy, the
    probe noise of compile) to 2%. A tensor whose loss curves down measures nothing and is floored at 1% of the
    median (no tensor looks free)."""
    batch, names = TOKENS[:1], SMOOTH + [BENT]
    params = calibrate.checkpoint_parameters(baseline64)
    want = {n: _curvature(baseline64, batch, params[n], z) for n, z in _probe_draws(params, names, 1e-3).items()}
    assert want[BENT] < 0 < min(want[n] for n in SMOOTH)

    def loss() -> float:
        return float(F.cross_entropy(baseline64(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()))
    small = calibrate.probe(params, names, loss, noise=1e-3)
    for n in SMOOTH:
        assert small[n] == pytest.approx(want[n], rel=1e-3), n
    assert small[BENT] == 0.0

    sens = calibrate.sensitivities(baseline64, batch, names, noise=0.01, method="probe")
    for n in SMOOTH:
        assert sens[n] == pytest.approx(want[n], rel=0.02), n
    assert sens[BENT] == pytest.approx(0.01 * sorted(sens[n] for n in SMOOTH)[1], rel=1e-12)


@torch.no_grad()
def test_a_layer_output_loss_has_the_calibration_hessian_as_sensitivity(baseline, baseline_calibration):
    """A quadratic loss whose Hessian is known: ½·mean‖(W' − W)·x‖² over the real inputs x of a fixture layer, whose
    Hessian is calibration's E[x xᵀ]. The probe (noise of compile's size, exact here: no higher terms) gives
    ½·Σ_r z_r H z_rᵀ for its own noise z, and ½·R·tr(H) in expectation (within 4 standard deviations of the
    estimate: var(zᵀHz) = 2·tr(H²) per row)."""
    name = "blocks.1.mlp.proj.weight"
    rows = []
    hook = baseline.blocks[1].mlp.proj.register_forward_hook(lambda m, inp, out: rows.append(inp[0]))
    baseline(TOKENS)  # the tokens calibration saw
    hook.remove()
    x = rows[0].reshape(-1, rows[0].shape[-1]).double()
    w0 = baseline.blocks[1].mlp.proj.weight.detach().double()
    params = {name: w0.clone()}

    def loss() -> float:
        return float(0.5 * ((x @ (params[name] - w0).T) ** 2).sum(1).mean())
    got = calibrate.probe(params, [name], loss)[name]
    assert torch.equal(params[name], w0)  # the probe is undone
    h, z = baseline_calibration.hessians[name], _probe_draws(params, [name])[name]
    assert _close_to(h, _gram(x))
    assert got == pytest.approx(0.5 * float(((z @ h) * z).sum()), rel=1e-5)  # h: float32 Grams (_close_to)
    rows_, trace = z.shape[0], float(h.trace())
    spread = (2 * float((h @ h).trace()) / rows_) ** 0.5 / trace
    assert abs(got / (0.5 * rows_ * trace) - 1) < 4 * spread


class _Tables(nn.Module):
    """A lookup-only table (a bigram-hash or value embedding), a tied one (looked up and used as the head) and a
    projection, all real fixture weights."""

    def __init__(self, sd):
        super().__init__()
        self.table = nn.Embedding.from_pretrained(sd["tok_emb.weight"].float()[:, :64].clone(), freeze=False)
        self.tied = nn.Embedding.from_pretrained(sd["tok_emb.weight"].float().clone(), freeze=False)
        self.proj = nn.Parameter(sd["blocks.0.mlp.proj.weight"].float()[:, :64].clone())

    def forward(self, ids):
        x = rms_norm(self.tied(ids) + F.linear(self.table(ids), self.proj))
        return F.linear(x, self.tied.weight)


@torch.no_grad()
def test_a_lookup_table_is_named_as_one(fixture_sd):
    """F.embedding multiplies by nothing: a table only looked up gets no Hessian, and the reason says it is a lookup
    table (not 'never multiplied by', which reads like a calibration miss); a tied table, also the head, keeps the
    head's Hessian and no skip."""
    m = _Tables(fixture_sd)
    ids = TOKENS[:2]
    hessians, skipped = calibrate.collect_hessians(m, [ids])
    assert sorted(hessians) == ["proj", "tied.weight"]
    assert _close_to(hessians["proj"], _gram(m.table.weight[ids]))
    assert skipped["table.weight"] == "a lookup table (F.embedding): token ids select its rows, nothing is " \
                                      "multiplied by it, so it has no input Hessian"
    cal = calibrate.calibrate(m, ids)
    assert sorted(cal.skipped) == ["table.weight"]  # the tied table's lookup is dropped: it has the head's Hessian
    x = rms_norm(m.tied(ids) + F.linear(m.table(ids), m.proj))
    assert _close_to(cal.hessians["tied.weight"], _gram(x))
