"""fixtures/banked_gpt.py: the record-style banked re-implementation of the fixture model computes the baseline's
function, its options (loops, wrap) do what they say, and build loads strictly."""
import importlib.util

import pytest
import torch

from squeeze.models.pgolf import GPT

from conftest import FIXTURES

_spec = importlib.util.spec_from_file_location("banked_gpt_fixture", FIXTURES / "banked_gpt.py")
banked_gpt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(banked_gpt)


@pytest.fixture(scope="module")
def banked_sd(fixture_sd):
    return banked_gpt.bank_state_dict(fixture_sd)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 1024, (2, 64), generator=torch.Generator().manual_seed(0))


def test_layout(fixture_sd, banked_sd):
    keys = list(banked_sd)
    assert keys[:5] == ["tok_emb.weight", "qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank"]
    rest = [k for k in fixture_sd if not k.endswith(".weight") or k == "tok_emb.weight"]
    assert keys[5:] == [k for k in rest if k != "tok_emb.weight"]
    assert banked_sd["tok_emb.weight"] is fixture_sd["tok_emb.weight"]  # unchanged (bf16)
    shapes = {k: tuple(banked_sd[k].shape) for k in banked_gpt.BANKS}
    assert shapes == {"qo_bank": (8, 256, 256), "kv_bank": (8, 128, 256), "mlp_up_bank": (4, 512, 256),
                      "mlp_down_bank": (4, 256, 512)}
    assert all(banked_sd[k].dtype == torch.float32 for k in banked_gpt.BANKS)
    assert torch.equal(banked_sd["qo_bank"][1], fixture_sd["blocks.1.attn.c_q.weight"])
    assert torch.equal(banked_sd["qo_bank"][4 + 2], fixture_sd["blocks.2.attn.proj.weight"])
    assert torch.equal(banked_sd["kv_bank"][3], fixture_sd["blocks.3.attn.c_k.weight"])
    assert torch.equal(banked_sd["kv_bank"][4 + 0], fixture_sd["blocks.0.attn.c_v.weight"])
    assert torch.equal(banked_sd["mlp_down_bank"][2], fixture_sd["blocks.2.mlp.proj.weight"])
    assert sum(t.numel() for t in banked_sd.values()) == sum(t.numel() for t in fixture_sd.values())


def test_same_function_as_the_baseline(fixture_sd, banked_sd, ids):
    baseline = GPT.from_state_dict({k: v.float() for k, v in fixture_sd.items()}).eval()
    model = banked_gpt.build(banked_sd, {}).eval()
    assert isinstance(model, banked_gpt.BankedGPT)
    with torch.no_grad():
        want = baseline(ids)
        got = model.forward_logits(ids)
        assert got.shape == (2, 64, 1024) and got.dtype == torch.float32
        assert torch.allclose(got, want, atol=1e-5, rtol=0)
        # forward is the records' training loss: mean next-token cross-entropy
        loss = model(ids[:, :-1], ids[:, 1:])
        assert loss.dim() == 0
        assert float(loss) == pytest.approx(float(baseline.loss(ids[:, :-1], ids[:, 1:])), abs=1e-5)
    with pytest.raises(TypeError):
        model(ids)  # like the records: forward needs targets


def test_loops_change_the_function(banked_sd, ids):
    with torch.no_grad():
        plain = banked_gpt.build(banked_sd, {}).forward_logits(ids)
        once = banked_gpt.build(banked_sd, {"loops": [0, 2, 1]}).forward_logits(ids)
        assert torch.equal(once, plain)  # n = 1: the baseline
        for loops in ([0, 2, 2], [1, 2, 3], [2, 4, 2], [3, 4, 2]):
            looped = banked_gpt.build(banked_sd, {"loops": loops})
            out = looped.forward_logits(ids)
            assert out.shape == plain.shape and torch.isfinite(out).all()
            assert not torch.allclose(out, plain, atol=1e-3), loops
    with pytest.raises(ValueError, match="encoder"):
        banked_gpt.build(banked_sd, {"loops": [1, 3, 2]})  # spans the U-net's middle
    with pytest.raises(ValueError, match="a, b, n"):
        banked_gpt.build(banked_sd, {"loops": [1, 2]})


def test_looped_layers_run_n_times(banked_sd, ids):
    model = banked_gpt.build(banked_sd, {"loops": [2, 4, 3]})
    calls = []
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, inp, out, i=i: calls.append(i))
    with torch.no_grad():
        model.forward_logits(ids)
    assert calls == [0, 1, 2, 3, 2, 3, 2, 3]


def test_wrapper_prefixes_names(banked_sd, ids):
    wrapped = banked_gpt.build(banked_sd, {"wrap": True})
    assert isinstance(wrapped, banked_gpt.Wrapper) and isinstance(wrapped.model, banked_gpt.BankedGPT)
    names = [n for n, _ in wrapped.named_parameters()]
    assert {"model.tok_emb.weight", "model.qo_bank", "model.kv_bank", "model.mlp_up_bank",
            "model.mlp_down_bank", "model.blocks.0.attn.q_gain"} <= set(names)
    assert all(n.startswith("model.") for n in names)
    assert set(wrapped.state_dict()) == {f"model.{k}" for k in banked_sd}
    with torch.no_grad():
        assert torch.equal(wrapped.forward_logits(ids), wrapped.model.forward_logits(ids))
        assert torch.equal(wrapped(ids[:, :-1], ids[:, 1:]), wrapped.model(ids[:, :-1], ids[:, 1:]))


def test_build_loads_strictly(banked_sd):
    extra = dict(banked_sd, skip_gates=torch.zeros(2, 256))
    with pytest.raises(RuntimeError, match="skip_gates"):
        banked_gpt.build(extra, {})
    missing = {k: v for k, v in banked_sd.items() if k != "blocks.1.mlp_scale"}
    with pytest.raises(RuntimeError, match="blocks.1.mlp_scale"):
        banked_gpt.build(missing, {})
    with pytest.raises(RuntimeError, match="for BankedGPT"):  # the checkpoint's names, loaded into the inner GPT
        banked_gpt.build(extra, {"wrap": True})
    with pytest.raises(ValueError, match="unknown config"):
        banked_gpt.build(banked_sd, {"depth": 3})
