"""The command line, as a user runs it: outputs, the JSON report, and one-line errors with no partial files."""
import argparse
import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import squeeze
from squeeze.cli import main

from conftest import CKPT, RECIPES, ROOT


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "squeeze", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


@pytest.mark.slow
def test_compile_inspect_emit_decoder_end_to_end(tmp_path):
    out = tmp_path / "model.sqz"
    r = run("compile", CKPT, "--recipe", RECIPES / "int8-baseline.toml", "-o", out, "--verbose")
    assert r.returncode == 0, r.stderr
    assert f"{out}: {out.stat().st_size:,} bytes" in r.stdout
    assert [line.split()[0] for line in r.stderr.splitlines()] == ["tie", "classify", "stack", "plan", "allocate",
                                                                    "quantize", "gptq", "lowrank", "pack", "encode"]
    r = run("inspect", out)
    assert r.returncode == 0 and "tok_emb.weight" in r.stdout and f"= {out.stat().st_size:,} B" in r.stdout
    r = run("inspect", out, "--json")
    report = json.loads(r.stdout)
    assert report["file_size"] == out.stat().st_size
    assert report["preamble_bytes"] + report["header_bytes"] + sum(t["bytes"] for t in report["tensors"]) \
        == out.stat().st_size
    r = run("emit-decoder", out, "-o", tmp_path / "decode.py")
    assert r.returncode == 0 and "bytes" in r.stdout
    code = "import decode, squeeze, torch; a = decode.squeeze_load('model.sqz'); b = squeeze.load('model.sqz'); " \
           "print(len(a), all(torch.equal(a[k], b[k]) for k in a))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.stdout.split() == [str(len(torch.load(CKPT, weights_only=True))), "True"], r.stderr


@pytest.mark.slow
def test_default_recipe_and_nested_and_safetensors_checkpoints(tmp_path, fixture_small):
    from safetensors.torch import save_file
    torch.save({"model": fixture_small, "step": 10}, tmp_path / "nested.pt")
    save_file(fixture_small, tmp_path / "m.safetensors")
    runner = CliRunner()
    blobs = []
    for name in ("nested.pt", "m.safetensors"):
        result = runner.invoke(main, ["compile", str(tmp_path / name), "-o", str(tmp_path / f"{name}.sqz")])
        assert result.exit_code == 0, result.output
        blobs.append((tmp_path / f"{name}.sqz").read_bytes())
    assert blobs[0] == squeeze.compile(fixture_small)
    # safetensors lists tensors in its own order, so the bytes differ, but not the tensors
    from_pt, from_st = squeeze.load(blobs[0]), squeeze.load(blobs[1])
    assert sorted(from_pt) == sorted(from_st) and all(torch.equal(from_pt[k], from_st[k]) for k in from_pt)


def one_line_error(result) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_unknown_recipe_key(tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text("[defaults]\nbits = 6\nclip_sigma = 12\n")
    line = one_line_error(run("compile", CKPT, "--recipe", recipe, "-o", tmp_path / "m.sqz"))
    assert line == f"squeeze: error: {recipe}:3: unknown key 'clip_sigma' in [defaults]"
    assert not (tmp_path / "m.sqz").exists()


@pytest.mark.slow
def test_damaged_artifact(tmp_path):
    out = tmp_path / "m.sqz"
    assert run("compile", CKPT, "-o", out).returncode == 0
    blob = bytearray(out.read_bytes())
    last = squeeze.inspect(bytes(blob)).sections[-1]
    blob[len(blob) - 2] ^= 0x04
    out.write_bytes(bytes(blob))
    expected = f"squeeze: error: {out}: section {last['index']} ({last['name']}): checksum mismatch (the file is damaged)"
    assert one_line_error(run("inspect", out)) == expected  # inspect checks every section's CRC
    assert one_line_error(run("emit-decoder", out, "-o", tmp_path / "d.py")) == expected
    out.write_bytes(bytes(blob[:-50]))
    assert one_line_error(run("inspect", out)).startswith(
        f"squeeze: error: {out}: section {last['index']} ({last['name']}): truncated")


@pytest.mark.slow
def test_pickled_objects_are_refused(tmp_path):
    # training scripts often save their argparse namespace beside the weights; weights_only loading refuses it
    torch.save({"model": argparse.Namespace(lr=0.1)}, tmp_path / "evil.pt")
    line = one_line_error(run("compile", tmp_path / "evil.pt", "-o", tmp_path / "m.sqz"))
    assert line.startswith(f"squeeze: error: {tmp_path / 'evil.pt'}: refused, it needs unpickling")
    assert "torch.save(model.state_dict(), path)" in line
    assert not (tmp_path / "m.sqz").exists()


@pytest.mark.parametrize("content,message", [
    (None, "no such checkpoint file"),
    (b"not a checkpoint", "not a readable PyTorch checkpoint"),
])
@pytest.mark.slow
def test_bad_checkpoints(tmp_path, content, message):
    ckpt = tmp_path / "c.pt"
    if content is not None:
        ckpt.write_bytes(content)
    line = one_line_error(run("compile", ckpt, "-o", tmp_path / "m.sqz"))
    assert line.startswith(f"squeeze: error: {ckpt}: {message}")


@pytest.mark.slow
def test_nan_is_reported_by_tensor_name(tmp_path, fixture_small):
    sd = dict(fixture_small)
    sd["blocks.0.mlp.fc.weight"] = sd["blocks.0.mlp.fc.weight"].clone()
    sd["blocks.0.mlp.fc.weight"][3, 4] = float("nan")
    torch.save(sd, tmp_path / "nan.pt")
    existing = tmp_path / "m.sqz"
    existing.write_bytes(b"precious")
    line = one_line_error(run("compile", tmp_path / "nan.pt", "-o", existing))
    assert line == "squeeze: error: blocks.0.mlp.fc.weight: 1 NaN/Inf value(s); squeeze refuses to compile " \
                   "non-finite weights"
    assert existing.read_bytes() == b"precious"  # nothing lost


@pytest.mark.slow
def test_not_an_artifact(tmp_path):
    bogus = tmp_path / "x.sqz"
    bogus.write_bytes(b"hello world, this is not an artifact")
    assert one_line_error(run("inspect", bogus)) == \
        f"squeeze: error: {bogus}: not a squeeze artifact (bad magic b'hell')"
    assert one_line_error(run("emit-decoder", tmp_path / "missing.sqz", "-o", tmp_path / "d.py")).startswith(
        f"squeeze: error: {tmp_path / 'missing.sqz'}: cannot read")
    assert not (tmp_path / "d.py").exists()


def test_failed_reread_names_the_output_not_the_temporary_file(tmp_path):
    from squeeze.cli import write_atomically
    out = tmp_path / "m.sqz"
    with pytest.raises(squeeze.SqueezeError) as err:
        write_atomically(str(out), b"not an artifact at all", check=squeeze.load)
    assert str(err.value).startswith(f"{out} (re-read before writing): ")
    assert list(tmp_path.iterdir()) == []  # neither the output nor the temporary file is left
