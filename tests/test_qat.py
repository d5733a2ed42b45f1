"""squeeze.qat: with fake-quant on, the model computes with exactly the weights the compiled artifact decodes to."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import squeeze
from squeeze import qat, quant
from squeeze.data import read_shard
from squeeze.models.pgolf import GPT
from squeeze.quant import QuantSpec
from squeeze.recipe import parse

from conftest import FIXTURES, bitwise_equal

# Fast recipes (zlib) with max_numel low enough that every block matrix of the fixture is quantized; `q_gain`
# (4 elements) is then small and the rest of the 1-D/[2, dim] tensors are control tensors.
BASE = 'name="qat-test"\n[encode]\ncodec="zlib"\n[keep_float]\nmax_numel=1024\n'

# Every knob of the recipe format that changes the decoded weights, each value at least once.
SCHEMES = {
    "int2-row-absmax-f16": "[defaults]\nbits=2\nclip='absmax'\n",
    "int3-g64-std-bf16": "[defaults]\nbits=3\ngroup_size=64\nclip='std'\nclip_std_k=2.5\nscale_dtype='bf16'\n",
    "int4-row-std-f32": "[defaults]\nbits=4\nclip='std'\nclip_std_k=3.0\nscale_dtype='fp32'\n",
    "int5-g100-percentile": "[defaults]\nbits=5\ngroup_size=100\nclip='percentile'\nclip_percentile=99.5\n",
    "int6-row-mse": "[defaults]\nbits=6\nclip='mse'\nmse_grid=8\n",
    "int7-g64-mse-bf16": "[defaults]\nbits=7\ngroup_size=64\nclip='mse'\nmse_grid=4\nscale_dtype='bf16'\n",
    "int8-row-absmax-floor": "[defaults]\nbits=8\nclip='absmax'\nscale_min=0.0078740157\n",
    "int8-row-percentile-f32": "[defaults]\nbits=8\nclip='percentile'\nclip_percentile=99.99\nscale_dtype='fp32'\n",
    "mixed-rules-float-routing": (  # c_k (32,768 elements) is small here, so bf16; c_v goes fp16 by a rule
        "[defaults]\nbits=6\nclip='std'\nclip_std_k=6.0\n"
        "[keep_float]\nmax_numel=32768\ncontrol_dtype='fp16'\nsmall_dtype='bf16'\n"
        "[[rules]]\nmatch='tok_emb.weight'\nbits=8\nclip='std'\nclip_std_k=12.0\n"
        "[[rules]]\nmatch='re:attn\\.c_v'\nscheme='float'\nfloat_dtype='fp16'\n"
        "[[rules]]\nmatch='re:mlp\\.proj'\nbits=4\ngroup_size=128\nclip='absmax'\n"),
    "control-fp32-small-keep": "[defaults]\nbits=5\n[keep_float]\nmax_numel=32768\ncontrol_dtype='fp32'\n"
                               "small_dtype='keep'\n",
}


def recipe_of(scheme: str):
    text = SCHEMES[scheme]
    if "[keep_float]" in text:  # the scheme's own table replaces BASE's
        return parse(BASE.replace("[keep_float]\nmax_numel=1024\n", "") + text, f"{scheme}.toml")
    return parse(BASE + text, f"{scheme}.toml")


@pytest.fixture(scope="module")
def block_sd(fixture_sd) -> dict:
    """A one-block cut of the fixture (the embedding, block 0, no U-Net skip), fp32 as the model holds it."""
    sd = {k: v for k, v in fixture_sd.items() if k.startswith(("tok_emb.weight", "blocks.0."))}
    sd["skip_weights"] = fixture_sd["skip_weights"][:0]
    return GPT.from_state_dict(sd).state_dict()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.from_numpy(read_shard(FIXTURES / "val_000000.bin")[:2 * 32]).reshape(2, 32)


def fresh(sd) -> GPT:
    return GPT.from_state_dict({k: v.clone() for k, v in sd.items()})


def parametrized_value(model: nn.Module, name: str) -> torch.Tensor:
    path, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(path) if path else model, attr).detach()


def decoded_model(handle) -> tuple[GPT, dict]:
    decoded = squeeze.load(handle.compile())
    return GPT.from_state_dict(decoded), decoded


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_forward_equals_the_decoded_artifact(block_sd, tokens, scheme):
    recipe = recipe_of(scheme)
    model = fresh(block_sd)
    qat.prepare(model, recipe)
    decoded = squeeze.load(squeeze.compile(model.state_dict(), recipe))
    for name, tensor in decoded.items():  # every tensor the model computes with is the decoded one
        assert bitwise_equal(parametrized_value(model, name), tensor), name
    with torch.no_grad():
        assert bitwise_equal(model(tokens), GPT.from_state_dict(decoded)(tokens))


def test_routing_is_the_compilers(block_sd):
    recipe = recipe_of("mixed-rules-float-routing")
    model = fresh(block_sd)
    handle = qat.prepare(model, recipe)
    kinds = {t.name: (t.plan.scheme, t.plan.store) for t in handle.targets}
    assert kinds["blocks.0.attn.c_k.weight"] == ("float", "bf16")   # small: fake-cast to the small dtype
    assert kinds["blocks.0.attn.c_v.weight"] == ("float", "f16")    # the rule's float dtype
    assert kinds["blocks.0.attn_scale"] == kinds["blocks.0.attn.q_gain"] == ("float", "f16")  # control
    plans = {t.name: t.plan.quant for t in handle.targets if t.plan.scheme == "int"}
    assert plans["tok_emb.weight"].bits == 8 and plans["blocks.0.mlp.proj.weight"].group == 128
    assert plans["blocks.0.attn.c_q.weight"].bits == 6 and len(plans) == 1 + 4
    assert handle.compile() == squeeze.compile(model.state_dict(), recipe)  # fixed scales: the same bytes
    untouched = qat.prepare(fresh(block_sd), recipe, cast_float=False)
    assert {t.name for t in untouched.targets} == set(plans)


def test_autocast_forward_equals_the_decoded_artifact(block_sd, tokens):
    recipe = recipe_of("mixed-rules-float-routing")
    model = fresh(block_sd)
    handle = qat.prepare(model, recipe)
    decoded, _ = decoded_model(handle)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert bitwise_equal(model(tokens), decoded(tokens))


def test_learned_scales_train_and_are_exported(block_sd, tokens):
    recipe = recipe_of("int3-g64-std-bf16")
    model = fresh(block_sd)
    handle = qat.prepare(model, recipe, learn_scales=True)
    before = {n: s.clone() for n, s in handle.learned_scales().items()}
    opt = torch.optim.Adam(handle.scale_parameters(), lr=1e-3)
    for _ in range(2):
        model.loss(tokens[:, :-1], tokens[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
    after = handle.learned_scales()
    assert set(after) == {t.name for t in handle.targets if t.plan.scheme == "int"}
    assert all(s.ndim == 1 for s in handle.scale_parameters())  # 1-D: scripts route them to Adam, not Muon
    assert any(not torch.equal(before[n], after[n]) for n in after)
    decoded, tensors = decoded_model(handle)
    for name in tensors:
        assert bitwise_equal(parametrized_value(model, name), tensors[name]), name
    with torch.no_grad():
        assert bitwise_equal(model(tokens), decoded(tokens))
    assert handle.compile() != squeeze.compile(model.state_dict(), recipe)  # compile alone would choose anew
    resumed = qat.prepare(fresh(model.state_dict()), recipe, learn_scales=True)
    resumed.load_learned_scales(after)
    assert resumed.compile() == handle.compile()
    assert not any("parametrizations" in k for k in model.state_dict())


def test_tied_parameter_is_fake_quantized_once():
    torch.manual_seed(0)
    model = TiedLM()
    order = list(model.state_dict())
    recipe = parse(BASE.replace("max_numel=1024", "max_numel=32") + "[defaults]\nbits=4\nclip='std'\nclip_std_k=3\n")
    handle = qat.prepare(model, recipe)
    tied = [t for t in handle.targets if len(t.places) == 2]
    assert [t.name for t in tied] == ["emb.weight"] and tied[0].places == (("emb", "weight"), ("head", "weight"))
    assert model.emb.parametrizations.weight[0] is model.head.parametrizations.weight[0]
    assert list(model.state_dict()) == order == ["gain", "emb.weight", "fc.weight", "head.weight"]
    decoded = squeeze.load(handle.compile())
    assert decoded["head.weight"] is decoded["emb.weight"]  # the compiler aliased the tie
    ids = torch.randint(0, 64, (2, 8))
    plain = TiedLM()
    plain.load_state_dict(decoded)
    with torch.no_grad():
        assert bitwise_equal(model(ids), plain(ids))
    handle.remove()
    assert model.head.weight is model.emb.weight


def test_only_selects_by_pattern_or_callable(block_sd):
    recipe = recipe_of("int4-row-std-f32")
    mlp = qat.prepare(fresh(block_sd), recipe, only=["re:mlp"])
    assert sorted(t.name for t in mlp.targets) == ["blocks.0.mlp.fc.weight", "blocks.0.mlp.proj.weight"]
    glob = qat.prepare(fresh(block_sd), recipe, only="blocks.0.attn.*")
    assert {t.name for t in glob.targets} == {f"blocks.0.attn.{m}.weight" for m in ("c_q", "c_k", "c_v", "proj")}
    emb = qat.prepare(fresh(block_sd), recipe, config=qat.QATConfig(only=lambda name: name.startswith("tok")))
    assert [t.name for t in emb.targets] == ["tok_emb.weight"]


def test_enable_disable_schedule_and_remove(block_sd, tokens):
    recipe = recipe_of("int4-row-std-f32")
    model, plain = fresh(block_sd), fresh(block_sd)
    originals = list(model.parameters())
    order = list(model.state_dict())
    handle = qat.prepare(model, recipe, enabled=False)
    with torch.no_grad():
        assert bitwise_equal(model(tokens), plain(tokens))
        handle.enable()
        assert not torch.equal(model(tokens), plain(tokens))
    handle.set_schedule(lambda step: step >= 2)
    assert [handle.enabled] + [handle.step() for _ in range(3)] == [False, False, True, True]
    # a training step moves the raw weights; state_dict keeps the plain names, order and trained values
    opt = torch.optim.SGD(originals, lr=0.1)
    model.loss(tokens[:, :-1], tokens[:, 1:]).backward()
    opt.step()
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    assert list(trained) == order and not torch.equal(trained["tok_emb.weight"], block_sd["tok_emb.weight"])
    model.load_state_dict(block_sd)  # plain names load into the prepared model
    assert bitwise_equal(parametrized_value(model, "skip_weights"), block_sd["skip_weights"])
    model.load_state_dict(trained)
    handle.remove()
    assert len(list(model.parameters())) == len(originals)
    assert all(p is q for p, q in zip(model.parameters(), originals)) and list(model.state_dict()) == order
    assert all(bitwise_equal(model.state_dict()[k], v) for k, v in trained.items())
    with pytest.raises(RuntimeError, match="removed"):
        handle.enable()


@pytest.mark.slow
@pytest.mark.parametrize("learn_scales", [False, True])
def test_compiled_forward_equals_eager_and_gradients_flow(block_sd, tokens, learn_scales):
    """dynamo + AOTAutograd with eager kernels: traced parametrizations, guards on enable/disable, backward."""
    recipe = recipe_of("mixed-rules-float-routing")
    model, plain = fresh(block_sd), fresh(block_sd)
    handle = qat.prepare(model, recipe, enabled=False, learn_scales=learn_scales)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: no graph break anywhere
    with torch.no_grad():
        assert bitwise_equal(compiled(tokens), plain(tokens))
    handle.enable()  # a late start must reach the compiled model (dynamo guards the flag and recompiles)
    eager_out = model(tokens)
    eager_out.float().square().mean().backward()
    trained = [p for p in model.parameters() if p.numel()]  # the one-block cut's skip_weights are empty
    eager_grads = [p.grad.clone() for p in trained]
    model.zero_grad()
    out = compiled(tokens)
    assert bitwise_equal(out, eager_out)
    out.float().square().mean().backward()
    for p, eager_g in zip(trained, eager_grads):
        assert p.grad is not None and p.grad.abs().sum() > 0 and torch.allclose(p.grad, eager_g, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        assert bitwise_equal(compiled(tokens), GPT.from_state_dict(squeeze.load(handle.compile()))(tokens))


class TiedLM(nn.Module):
    """A tiny language model whose head is its embedding (two modules hold one Parameter), with an fp16 gain."""

    def __init__(self, vocab: int = 64, dim: int = 32):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim, dim, bias=False)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def forward(self, ids):
        x = self.emb(ids)
        x = F.rms_norm(x + self.gain * torch.relu(self.fc(x)), (x.shape[-1],))
        return self.head(x)


def test_inductor_computes_with_the_artifact_weights():
    """Inductor drops fp16 round trips inside fused kernels; the fake-quant's rounding steps are custom ops so the
    compiled prepared model computes with the decoded weights. Not bit for bit: inductor fuses the two graphs
    differently around the custom ops and may order float sums differently (4e-6 of outputs up to 43 on an AMD EPYC
    VM), so the bound is float-sum noise, three orders of magnitude below what one dropped fp16 rounding of the
    scales would make (~1e-3 relative)."""
    torch.manual_seed(0)
    model = TiedLM()
    recipe = parse('name="t"\n[encode]\ncodec="zlib"\n[keep_float]\nmax_numel=32\nsmall_dtype="fp16"\n'
                   '[defaults]\nbits=4\nclip="std"\nclip_std_k=3\n')
    handle = qat.prepare(model, recipe)
    plain = TiedLM()
    plain.load_state_dict(squeeze.load(handle.compile()))
    ids = torch.randint(0, 64, (2, 8))
    out, ref = torch.compile(model)(ids), torch.compile(plain)(ids)
    assert (out - ref).abs().max() <= 1e-6 * ref.abs().max()
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_fake_quantize_is_quantize_then_dequantize(fixture_sd):
    w = fixture_sd["blocks.1.mlp.fc.weight"]
    for spec in (QuantSpec(bits=3, group=100, clip="percentile", clip_value=99.0), QuantSpec(bits=6, clip="mse"),
                 QuantSpec(bits=8, clip="std", clip_value=12.0, scale_dtype="bf16")):
        codes, scales = quant.quantize(w, spec)
        decoded = quant.dequantize(codes, scales, spec.group, w.dtype, w.shape)
        assert bitwise_equal(quant.fake_quantize(w, spec), decoded)


def test_prepare_reports_problems_by_name(block_sd):
    model = fresh(block_sd)
    with torch.no_grad():
        model.blocks[0].mlp.fc.weight.mul_(1e6)
    with pytest.raises(ValueError, match="blocks.0.mlp.fc.weight: a scale exceeds the range of f16"):
        qat.prepare(model, recipe_of("int2-row-absmax-f16"))
    model = fresh(block_sd)
    qat.prepare(model, recipe_of("int2-row-absmax-f16"))
    with pytest.raises(ValueError, match="already parametrized"):
        qat.prepare(model, recipe_of("int2-row-absmax-f16"))
