"""GPTQ on the fixture: calibration Hessians, codes never worse than round-to-nearest on the layer loss, a lower
model loss on held-out text at low bit widths, determinism, and clear errors."""
import pytest
import torch

import squeeze
from squeeze import calibrate
from squeeze.data import read_shard
from squeeze.errors import SqueezeError
from squeeze.models.pgolf import GPT
from squeeze.passes import gptq
from squeeze.recipe import parse

from conftest import CKPT, FIXTURES

INT4 = '[defaults]\nbits = 4\nclip = "std"\nclip_std_k = 4.0\n[keep_float]\nmax_numel = 4096\n' \
       '[encode]\ncodec = "zlib"\nzlib_level = 1\n'


@pytest.fixture(scope="module")
def self_calibration(fixture_sd):
    """Hessians from 8 sequences of 128 tokens the fixture model writes itself (no data needed)."""
    return calibrate.calibration_for(fixture_sd, calib_self=8, seq_len=128, device="cpu")


VAL = torch.from_numpy(read_shard(FIXTURES / "val_000000.bin"))
CALIB_TEXT, HELDOUT_TEXT = VAL[:32768], VAL[32768:]  # disjoint halves: calibrate on one, measure on the other


@pytest.fixture(scope="module")
def text_calibration(fixture_sd):
    model = GPT.from_state_dict({k: v.float() for k, v in fixture_sd.items()})
    return calibrate.calibrate(model, calibrate.windows_of(CALIB_TEXT, 256, 32768))


@torch.no_grad()
def text_loss(state_dict, text: torch.Tensor) -> float:
    n = (text.numel() - 1) // 256
    model = GPT.from_state_dict({k: v.float() for k, v in state_dict.items()}).eval()
    return model.loss(text[:n * 256].reshape(n, 256), text[1:n * 256 + 1].reshape(n, 256)).item()


def test_hessians_cover_every_matrix_the_forward_multiplies_by(self_calibration, fixture_sd):
    """Every block linear and the tied head (F.linear(x, tok_emb.weight)); tests/test_operands.py checks values."""
    h = self_calibration.hessians
    linears = [k for k, v in fixture_sd.items() if k.endswith(".weight") and k.startswith("blocks.")]
    assert sorted(h) == sorted(linears + ["tok_emb.weight"])
    for name in linears:
        cols = fixture_sd[name].shape[1]
        assert h[name].shape == (cols, cols) and torch.allclose(h[name], h[name].T)
        assert torch.linalg.eigvalsh(h[name]).min() > -1e-9  # a mean of x xᵀ is positive semi-definite
    assert self_calibration.tokens == 8 * 128


def test_identity_hessian_gives_round_to_nearest():
    """With uncorrelated inputs there is nothing to compensate: GPTQ's codes are round-to-nearest's."""
    w = torch.randn(16, 48, generator=torch.Generator().manual_seed(0))
    scale = (w.abs().amax(dim=1, keepdim=True) / 7).expand(16, 48)
    codes = gptq.gptq_codes(w, scale, 7, torch.eye(48), gptq.GPTQConfig(block_size=16))
    assert torch.equal(codes, torch.clamp(torch.round(w / scale), -7, 7).to(torch.int8))


def test_rate_aware_rounding_trades_layer_loss_for_entropy(fixture_sd, self_calibration):
    """gptq.RateTerm on a fixture matrix: λ = 0 gives plain GPTQ's codes; a growing λ lowers the codes' entropy and
    raises the layer loss, step by step (each choice weighs distortion against code length, nothing else)."""
    from squeeze.passes import allocate
    name = "blocks.1.mlp.fc.weight"
    w, h = fixture_sd[name].float(), self_calibration.hessians[name]
    spec = squeeze.quant.QuantSpec(bits=4, clip="std", clip_value=3.5)
    _, scales = squeeze.quant.quantize(w, spec, name)
    scale = scales.float().reshape(-1, 1).expand_as(w)
    plain = gptq.gptq_codes(w, scale, spec.qmax, h)
    counts = torch.bincount((plain.long() + spec.qmax).reshape(-1), minlength=2 * spec.qmax + 1).double()
    bits = -torch.log2((counts + 0.5) / (counts + 0.5).sum())
    assert torch.equal(gptq.gptq_codes(w, scale, spec.qmax, h, rate=gptq.RateTerm(bits, 0.0)), plain)
    per_weight = gptq.layer_loss(w, plain.float() * scale, h) / w.numel()
    sizes, losses = [], []
    for t in (0.0, 1.0, 4.0):
        codes = gptq.gptq_codes(w, scale, spec.qmax, h, rate=gptq.RateTerm(bits, t * per_weight))
        sizes.append(allocate.coded_bytes(codes, scales))
        losses.append(gptq.layer_loss(w, codes.float() * scale, h))
    assert sizes[0] > sizes[1] > sizes[2] and losses[0] < losses[1] < losses[2]
    assert sizes[2] < 0.98 * sizes[0]
    with pytest.raises(SqueezeError, match="a rate term needs one int qmax"):
        gptq.gptq_codes(w, scale, spec.qmax, h, rate=gptq.RateTerm(bits[:-1], 1.0))


@pytest.mark.slow
def test_gptq_never_loses_to_round_to_nearest_and_lowers_the_loss(fixture_sd, text_calibration):
    """Per layer, never worse than round-to-nearest on the calibration inputs (by construction); for the model,
    lower loss on the calibration text and on held-out text."""
    recipe = parse(INT4, "int4.toml")
    rtn = squeeze.compile_state_dict(fixture_sd, recipe)
    opt = squeeze.compile_state_dict(fixture_sd, recipe, hessians=text_calibration.hessians)
    notes = {e.name: e.note for e in opt.state.entries if e.note}
    assert sorted(notes) == sorted(text_calibration.hessians)
    rtn_codes = {e.name: e.codes for e in rtn.state.entries if e.codes is not None}
    for e in opt.state.entries:
        if e.name in text_calibration.hessians:
            h = text_calibration.hessians[e.name]
            w = e.tensor.reshape(e.codes.shape).float()
            s = e.scales.float().reshape(e.codes.shape[0], -1).expand_as(w)
            assert gptq.layer_loss(w, e.codes.float() * s, h) <= gptq.layer_loss(w, rtn_codes[e.name] * s, h)
    assert sum("× round-to-nearest" in n for n in notes.values()) >= len(notes) // 2
    for text in (CALIB_TEXT, HELDOUT_TEXT):
        assert text_loss(squeeze.load(opt.blob), text) < text_loss(squeeze.load(rtn.blob), text)


def test_gptq_is_deterministic(fixture_small, self_calibration):
    recipe = parse(INT4, "int4.toml")
    hessians = {k: v for k, v in self_calibration.hessians.items() if k in fixture_small}
    assert squeeze.compile(fixture_small, recipe, hessians) == squeeze.compile(fixture_small, recipe, hessians)


def test_method_rtn_ignores_calibration_and_gptq_needs_it(fixture_small, self_calibration):
    rtn_only = parse(INT4.replace('[keep_float]', 'method = "rtn"\n[keep_float]'), "rtn.toml")
    assert squeeze.compile(fixture_small, rtn_only, self_calibration.hessians) == squeeze.compile(fixture_small,
                                                                                                 rtn_only)
    wants_gptq = parse(INT4.replace('[keep_float]', 'method = "gptq"\n[keep_float]'), "gptq.toml")
    with pytest.raises(SqueezeError, match="asks for GPTQ but compile has no calibration data"):
        squeeze.compile(fixture_small, wants_gptq)


def test_calibration_inputs_are_checked(fixture_sd, tmp_path):
    with pytest.raises(SqueezeError, match="either --calib SHARDS or --calib-self N"):
        calibrate.calibration_for(fixture_sd, device="cpu")
    with pytest.raises(SqueezeError, match="no token shards match"):
        calibrate.calibration_for(fixture_sd, calib=str(tmp_path / "train_*.bin"), device="cpu")


@pytest.mark.slow
def test_cli_compiles_with_calibration_shards(tmp_path):
    """Plumbing only: the fixture ships no training shard, so its validation shard stands in here (a user must
    never calibrate on validation data)."""
    from click.testing import CliRunner
    from squeeze.cli import main
    out = tmp_path / "m.sqz"
    result = CliRunner().invoke(main, ["compile", str(CKPT), "-o", str(out), "--calib",
                                       str(FIXTURES / "val_*.bin"), "--calib-tokens", "1024", "--calib-seq-len",
                                       "256", "-v"])
    assert result.exit_code == 0, result.output
    assert "calibration: 1,024 tokens of" in result.output and out.stat().st_size > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gptq_on_cuda_matches_the_cpu(fixture_small, self_calibration):
    """--device cuda moves GPTQ's float64 work to the GPU: the same codes but for rare rounding ties."""
    name = next(k for k in self_calibration.hessians if k in fixture_small)
    w = fixture_small[name].float()
    scale = (w.abs().amax(dim=1, keepdim=True) / 7).expand_as(w)
    h = self_calibration.hessians[name]
    cpu = gptq.gptq_codes(w, scale, 7, h, gptq.GPTQConfig())
    gpu = gptq.gptq_codes(w, scale, 7, h, gptq.GPTQConfig(device="cuda"))
    assert gpu.device.type == "cpu" and gpu.dtype == torch.int8
    assert (cpu != gpu).float().mean() < 1e-3


@pytest.mark.slow
def test_a_hessian_of_fewer_rows_than_columns_is_a_warning(tmp_path):
    """128 calibration tokens for matrices of 256 and 512 columns: every Hessian is rank-deficient. The compile
    still runs GPTQ (damping keeps it defined) and says so in one line, in --json too."""
    import json
    from click.testing import CliRunner
    from squeeze.cli import main
    out = tmp_path / "m.sqz"
    result = CliRunner().invoke(main, [
        "compile", str(CKPT), "-o", str(out), "--calib", str(FIXTURES / "val_*.bin"), "--calib-tokens", "128",
        "--calib-seq-len", "64", "--json"])
    assert result.exit_code == 0, result.output
    warning = ("calibration: 25 Hessian(s) from fewer rows than their matrix has columns (fewest: "
               "blocks.0.mlp.proj.weight, 128 rows for 512 columns); GPTQ may fit the calibration text and lose "
               "elsewhere: calibrate on more tokens")
    assert json.loads(result.stdout)["warnings"] == [warning]
