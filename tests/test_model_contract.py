"""The --model contract (squeeze/verify/models.py): a record-style model whose forward needs targets and returns the
loss is scored through its forward_logits (or --forward NAME); wrong methods and state dicts that do not load are
one-line errors that name every offending key."""
import json

import pytest
import torch

import squeeze
from squeeze.errors import SqueezeError
from squeeze.verify import models

from conftest import CKPT, FIXTURES, RECIPES
from test_banked_fixture import banked_gpt
from test_verify_cli import QUICK, invoke, single_error_line, verify_args

pytest.importorskip("sentencepiece")

BANKED = f"{FIXTURES / 'banked_gpt.py'}:build"
INT8 = RECIPES / "int8-baseline.toml"
TINY = ["--seq-len", "256", "--max-tokens", "512", "--batch-size", "2"]


@pytest.fixture(scope="module")
def banked(fixture_sd, tmp_path_factory):
    """The fixture in the banked layout: (checkpoint path, artifact path)."""
    where = tmp_path_factory.mktemp("banked")
    sd = banked_gpt.bank_state_dict(fixture_sd)
    torch.save(sd, where / "banked.pt")
    (where / "banked.sqz").write_bytes(squeeze.compile(sd, squeeze.Recipe.load(INT8)))
    return where / "banked.pt", where / "banked.sqz"


def checkpoint_and_artifact(sd, where, name):
    torch.save(sd, where / f"{name}.pt")
    (where / f"{name}.sqz").write_bytes(squeeze.compile(sd, squeeze.Recipe.load(INT8)))
    return where / f"{name}.pt", where / f"{name}.sqz"


def test_verify_a_record_style_model(banked, fixture_sd, tmp_path):
    ckpt, artifact = banked
    runs = {}
    for label, extra in (("found", []), ("named", ["--forward", "forward_logits"])):
        result = invoke(*verify_args(artifact, *TINY, "--model", BANKED, *extra, "--json", "--no-report",
                                     ckpt=ckpt))
        assert result.exit_code == 0, result.output
        runs[label] = json.loads(result.stdout)
    (tmp_path / "wrap.json").write_text('{"wrap": true}')
    result = invoke(*verify_args(artifact, *TINY, "--model", BANKED, "--model-config", tmp_path / "wrap.json",
                                 "--json", "--no-report", ckpt=ckpt))
    assert result.exit_code == 0, result.output
    runs["wrapped"] = json.loads(result.stdout)
    # the baseline GPT on the baseline checkpoint: the same function, so the same original score
    baseline_artifact = tmp_path / "int8.sqz"
    baseline_artifact.write_bytes(squeeze.compile(fixture_sd, squeeze.Recipe.load(INT8)))
    result = invoke(*verify_args(baseline_artifact, *TINY, "--json", "--no-report"))
    assert result.exit_code == 0, result.output
    baseline = json.loads(result.stdout)
    for run in runs.values():
        assert run["original"]["tokens"] == baseline["original"]["tokens"] == 512
        assert run["original"]["val_loss"] == pytest.approx(baseline["original"]["val_loss"], abs=1e-6)
        assert run["decoded"]["val_loss"] == pytest.approx(runs["found"]["decoded"]["val_loss"], abs=1e-6)


def test_forward_errors_are_one_line(banked):
    ckpt, artifact = banked
    line = single_error_line(invoke(*verify_args(artifact, *QUICK, "--model", BANKED, "--forward", "logits",
                                                 ckpt=ckpt)))
    assert line == f"squeeze: error: --model {BANKED}: --forward logits: BankedGPT has no method 'logits'"
    line = single_error_line(invoke(*verify_args(artifact, *QUICK, "--model", BANKED, "--forward", "forward",
                                                 ckpt=ckpt)))
    assert line == f"squeeze: error: --model {BANKED}: BankedGPT.forward() needs 2 arguments (input_ids, " \
                   f"target_ids); pass --forward NAME for the method that returns logits"
    # the banked checkpoint is not the baseline's: say which tensors are missing and which are not its own
    line = single_error_line(invoke(*verify_args(artifact, *QUICK, ckpt=ckpt)))
    assert line == f"squeeze: error: {ckpt}: does not fit the Parameter Golf baseline GPT (no tensor " \
                   f"blocks.0.attn.c_k.weight, which the architecture is read from; unexpected keys: qo_bank, " \
                   f"kv_bank, mlp_up_bank, mlp_down_bank); for another architecture pass --model FILE.py:FACTORY"


def test_pgolf_load_errors_name_every_key(fixture_sd, tmp_path):
    sd = dict(fixture_sd, skip_gates=torch.zeros(2, 256), **{"blocks.9.extra": torch.zeros(1)})
    sd = {k: v for k, v in sd.items() if k not in ("blocks.1.attn.q_gain", "blocks.3.mlp_scale")}
    sd["blocks.2.resid_mix"] = torch.zeros(3, 256)
    build = models.resolve("pgolf", {}, "--model-config")
    with pytest.raises(SqueezeError) as e:
        build(sd, "ckpt.pt")
    assert str(e.value) == "ckpt.pt: does not fit the Parameter Golf baseline GPT (block indices are not 0..n-1: " \
                           "[0, 1, 2, 3, 9]); for another architecture pass --model FILE.py:FACTORY"
    del sd["blocks.9.extra"]
    with pytest.raises(SqueezeError) as e:
        build(sd, "ckpt.pt")
    assert str(e.value) == "ckpt.pt: does not fit the Parameter Golf baseline GPT (missing keys: " \
                           "blocks.1.attn.q_gain, blocks.3.mlp_scale; unexpected keys: skip_gates; shape " \
                           "mismatch: blocks.2.resid_mix [3, 256] (model [2, 256])); for another architecture " \
                           "pass --model FILE.py:FACTORY"
    # many keys: all of them, still one line
    many = {k: v for k, v in fixture_sd.items() if not k.endswith("_scale")}
    with pytest.raises(SqueezeError) as e:
        build(many, "ckpt.pt")
    assert "\n" not in str(e.value)
    assert all(k in str(e.value) for k in fixture_sd if k.endswith("_scale"))
    # through the CLI
    ckpt, artifact = checkpoint_and_artifact(
        {k: v for k, v in dict(fixture_sd, skip_gates=torch.zeros(2, 256)).items() if k != "blocks.1.attn.q_gain"},
        tmp_path, "gated")
    line = single_error_line(invoke(*verify_args(artifact, *QUICK, ckpt=ckpt)))
    assert line == f"squeeze: error: {ckpt}: does not fit the Parameter Golf baseline GPT (missing keys: " \
                   f"blocks.1.attn.q_gain; unexpected keys: skip_gates); for another architecture pass --model " \
                   f"FILE.py:FACTORY"


def test_user_model_load_errors_are_one_line(fixture_sd, tmp_path):
    sd = dict(banked_gpt.bank_state_dict(fixture_sd), skip_gates=torch.zeros(2, 256))
    sd = {k: v for k, v in sd.items() if k not in ("blocks.0.mlp_scale", "blocks.2.attn.q_gain")}
    ckpt, artifact = checkpoint_and_artifact(sd, tmp_path, "bad_banked")
    line = single_error_line(invoke(*verify_args(artifact, *QUICK, "--model", BANKED, ckpt=ckpt)))
    assert line == f"squeeze: error: {ckpt}: does not load into --model {BANKED} (BankedGPT: missing keys: " \
                   f"blocks.0.mlp_scale, blocks.2.attn.q_gain; unexpected keys: skip_gates)"
    # torch's message in full: size mismatches too; other RuntimeErrors pass through untouched
    message = ('Error(s) in loading state_dict for Net:\n\tMissing key(s) in state_dict: "a.weight", "b". \n\t'
               'Unexpected key(s) in state_dict: "c". \n\tsize mismatch for d: copying a param with shape '
               'torch.Size([4, 2]) from checkpoint, the shape in current model is torch.Size([2, 4]).')
    assert models.load_error_summary(message) == "Net: missing keys: a.weight, b; unexpected keys: c; shape " \
                                                 "mismatch: d [4, 2] (model [2, 4])"
    assert models.load_error_summary("CUDA out of memory") is None

    def factory(state_dict, config):
        raise RuntimeError("something else")
    with pytest.raises(RuntimeError, match="something else"):
        models._build_user_model(factory, "f.py:build", {}, {}, "ckpt.pt")


class TakesAnything(torch.nn.Module):
    """forward(*args) hides that it needs targets until it is called."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        return self.inner.forward(*args)


class ReturnsLoss(torch.nn.Module):
    def forward(self, input_ids, target_ids=None):
        return torch.zeros(())


def test_logits_fn(fixture_sd):
    model = banked_gpt.build(banked_gpt.bank_state_dict(fixture_sd), {})
    cpu = torch.device("cpu")
    fn = models.logits_fn(model, None, "m")
    assert fn.name == "BankedGPT.forward_logits" and models.logits_fn(fn) is fn
    assert models.vocab_of(fn, cpu, "m") == models.vocab_of(model, cpu, "m") == 1024
    with pytest.raises(SqueezeError, match=r"^--model m: TakesAnything.forward\(\) needs more arguments \(.*"
                                           r"target_ids.*\); pass --forward NAME"):
        models.vocab_of(TakesAnything(model), cpu, "m")
    with pytest.raises(SqueezeError, match=r"^--model m: ReturnsLoss.forward returned a scalar \(a loss\?\) for "
                                           r"input \[1, 8\]; expected logits"):
        models.vocab_of(ReturnsLoss(), cpu, "m")
    with pytest.raises(SqueezeError, match=r"BankedGPT.config is a GPTConfig, not a method"):
        models.logits_fn(model, "config", "m")
    # the baseline GPT has no forward_logits: forward, called through the module (hooks run)
    from squeeze.models.pgolf import GPT
    baseline = GPT.from_state_dict({k: v.float() for k, v in fixture_sd.items()})
    fn = models.logits_fn(baseline)
    assert fn.name == "GPT.forward"
    seen = []
    baseline.register_forward_hook(lambda *a: seen.append(1))
    fn(torch.zeros(1, 4, dtype=torch.int64))
    assert seen == [1]


def test_compile_calibrates_a_record_style_model(banked, tmp_path):
    ckpt, _ = banked
    recipe = tmp_path / "rtn.toml"  # calibration runs the model; GPTQ itself (slow on a CPU) is not the point here
    recipe.write_text(INT8.read_text().replace("[defaults]\n", '[defaults]\nmethod = "rtn"\n'))
    calib = ["--calib-self", "2", "--calib-seq-len", "16", "--model", BANKED, "--recipe", recipe]
    out = tmp_path / "gptq.sqz"
    ok = invoke("compile", ckpt, *calib, "--forward", "forward_logits", "-o", out)
    assert ok.exit_code == 0, ok.output
    assert set(squeeze.load(out)) == set(torch.load(ckpt, weights_only=True))
    line = single_error_line(invoke("compile", ckpt, *calib, "--forward", "forward", "-o", tmp_path / "x.sqz"))
    assert line == f"squeeze: error: --model {BANKED}: BankedGPT.forward() needs 2 arguments (input_ids, " \
                   f"target_ids); pass --forward NAME for the method that returns logits"
    assert not (tmp_path / "x.sqz").exists()
