"""`squeeze verify` as a user runs it: the report, the --max-drift gate, one-line errors, and torchrun with 2 CPU
processes (gloo) giving exactly the single-process result."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import squeeze
from squeeze.cli import main

from conftest import CKPT, FIXTURES, RECIPES, ROOT
from test_cli import one_line_error, run

pytest.importorskip("sentencepiece")

VAL = str(FIXTURES / "val_*.bin")
TOKENIZER = str(FIXTURES / "tokenizer_1024_bpe.model")
QUICK = ["--seq-len", "256", "--max-tokens", "2048", "--batch-size", "2"]  # 8 windows, 4 batches


@pytest.fixture(scope="module")
def artifact(fixture_sd, tmp_path_factory):
    path = tmp_path_factory.mktemp("verify_cli") / "int8.sqz"
    path.write_bytes(squeeze.compile(fixture_sd, squeeze.Recipe.load(RECIPES / "int8-baseline.toml")))
    return path


def verify_args(artifact, *extra, ckpt=CKPT, val=VAL, tokenizer=TOKENIZER):
    return ["verify", str(artifact), "--ckpt", str(ckpt), "--val", str(val), "--tokenizer", str(tokenizer), *extra]


def invoke(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def single_error_line(result) -> str:
    """In-process twin of test_cli.one_line_error: status 2, nothing on stdout, one line on stderr, no exception."""
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr.strip()


def test_text_report_and_the_max_drift_gate(artifact):
    ok = invoke(*verify_args(artifact, *QUICK, "--max-drift", "0.05"))
    assert ok.exit_code == 0, ok.output
    lines = ok.stdout.splitlines()
    assert lines[0].startswith(f"{artifact} vs {CKPT} on {VAL}: seq_len 256, non-overlapping; cpu fp32, 1 process")
    assert lines[1] == "bytes: tokenizer LUT"  # no CaseOps sidecars beside the fixture's shard (test_caseops.py)
    assert lines[2].split() == ["weights", "val_loss", "val_bpb", "tokens", "bytes", "seconds"]
    original, decoded, drift = (line.split() for line in lines[3:6])
    assert original[0] == "original" and decoded[0] == "decoded" and original[3] == decoded[3] == "2,048"
    assert drift[0] == "drift" and float(drift[2]) == pytest.approx(float(decoded[2]) - float(original[2]), abs=2e-6)
    assert lines[6] == f"artifact {artifact}: {artifact.stat().st_size:,} bytes, 2,101,776 params, " \
                       f"{8 * artifact.stat().st_size / 2_101_776:.3f} bits/param"
    assert ok.stderr == ""  # not a terminal: no progress bar

    # int8 costs about +0.0004 bpb on the first 4,096 tokens (on the first 2,048 it happens to gain)
    gated = invoke(*verify_args(artifact, "--seq-len", "256", "--max-tokens", "4096", "--max-drift", "0.0001", "--json"))
    assert gated.exit_code == 1
    report = json.loads(gated.stdout)
    assert report["max_drift"] == 0.0001 and report["drift"]["val_bpb"] > 0.0001
    assert gated.stderr.strip() == f"squeeze: val_bpb drift {report['drift']['val_bpb']:+.6f} exceeds --max-drift 0.0001"


def test_mirror_adds_the_mirrored_score_and_the_split(artifact):
    out = invoke(*verify_args(artifact, *QUICK, "--mirror", "--no-report"))
    assert out.exit_code == 0, out.output
    lines = out.stdout.splitlines()
    assert [line.split()[0] for line in lines[3:7]] == ["original", "decoded", "mirrored", "drift"]
    even, odd = float(lines[7].split()[3]), float(lines[7].split()[7])
    assert lines[7].startswith("drift = even ") and "(curvature) + odd" in lines[7]
    assert even + odd == pytest.approx(float(lines[6].split()[2]), abs=3e-6)
    report = json.loads(invoke(*verify_args(artifact, *QUICK, "--mirror", "--json", "--no-report")).stdout)
    drift = report["drift"]
    assert drift["even_val_bpb"] + drift["odd_val_bpb"] == pytest.approx(drift["val_bpb"], abs=1e-12)
    assert report["mirrored"]["tokens"] == 2048


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCHER_FAILURES = ("DistNetworkError", "RendezvousError", "Address already in use", "EADDRINUSE",
                     "connectFullMesh", "Connection refused")


@pytest.mark.slow
def test_torchrun_two_gloo_processes_equal_one_process(artifact):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    env = dict(os.environ, OMP_NUM_THREADS="1")  # what torchrun gives each process, so both runs do the same math
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"
    args = verify_args(artifact, *QUICK, "--json")
    one = subprocess.run([sys.executable, "-m", "squeeze", *args], capture_output=True, text=True, cwd=ROOT, env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "squeeze", *args],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    if two.returncode != 0 and any(marker in two.stderr for marker in LAUNCHER_FAILURES):
        pytest.skip(f"the distributed launcher could not start: {two.stderr.strip().splitlines()[-1]}")
    assert two.returncode == 0, two.stderr
    single, multi = json.loads(one.stdout), json.loads(two.stdout)  # only rank 0 printed: one JSON document
    assert multi["settings"] == {**single["settings"], "world_size": 2}
    for weights in ("original", "decoded"):
        for key in ("val_loss", "val_bpb", "tokens", "bytes"):
            assert multi[weights][key] == single[weights][key], (weights, key)
    assert multi["drift"] == single["drift"] and single["original"]["tokens"] == 2048


# ---------------------------------------------------------------- bad inputs

def test_empty_val_glob_is_one_line(artifact, tmp_path):
    pattern = str(tmp_path / "fineweb_val_*.bin")
    line = one_line_error(run(*verify_args(artifact, ckpt=CKPT, val=pattern)))  # a real process: no traceback
    assert line == f"squeeze: error: {pattern}: no token shards match"


def test_bad_shard_header(artifact, tmp_path):
    shard = tmp_path / "val_000000.bin"
    header = np.zeros(256, dtype="<i4")
    header[:3] = [20240521, 1, 4]
    shard.write_bytes(header.tobytes() + b"\x01\x00" * 4)
    assert single_error_line(invoke(*verify_args(artifact, val=tmp_path / "val_*.bin"))) == \
        f"squeeze: error: {shard}: not a token shard (header 20240521, 1; expected 20240520, 1)"


def two_block_checkpoint(sd: dict, vocab: int) -> dict:
    """A smaller baseline GPT cut from the fixture: blocks 0 and 1, one skip weight, the first `vocab` embeddings."""
    small = {k: v for k, v in sd.items() if k.startswith(("blocks.0.", "blocks.1."))}
    return {"tok_emb.weight": sd["tok_emb.weight"][:vocab].clone(), "skip_weights": sd["skip_weights"][:1].clone(),
            **small}


def test_mismatched_tensors_and_vocabulary(artifact, tmp_path, fixture_sd):
    # an artifact of another checkpoint: names differ
    small_vocab = two_block_checkpoint(fixture_sd, 512)
    torch.save(small_vocab, tmp_path / "small512.pt")
    small_artifact = tmp_path / "small512.sqz"
    small_artifact.write_bytes(squeeze.compile(small_vocab, squeeze.Recipe.load(RECIPES / "int8-baseline.toml")))
    line = single_error_line(invoke(*verify_args(small_artifact)))
    assert line == f"squeeze: error: {small_artifact}: tensor names differ from the checkpoint: " \
                   f"'blocks.2.attn_scale' is only in {CKPT} (and 19 more)"
    # same names, another shape
    torch.save(two_block_checkpoint(fixture_sd, 1024), tmp_path / "small1024.pt")
    line = single_error_line(invoke(*verify_args(small_artifact, ckpt=tmp_path / "small1024.pt")))
    assert line == f"squeeze: error: {small_artifact}: tensor 'tok_emb.weight' has shape [512, 256] but " \
                   f"[1024, 256] in {tmp_path / 'small1024.pt'}"
    # a model of 512 tokens against a tokenizer of 1024
    line = single_error_line(invoke(*verify_args(small_artifact, ckpt=tmp_path / "small512.pt")))
    assert line == f"squeeze: error: {TOKENIZER}: vocabulary of 1024 tokens, but the model predicts 512"


@pytest.mark.parametrize("extra,message", [
    (["--stride", "300", "--seq-len", "256"], "--stride 300: must be between 1 and --seq-len (256)"),
    (["--model", "no_such_module_xyz:build"], "no_such_module_xyz: cannot import module"),
    (["--model", "missing/arch.py:GPT"], "missing/arch.py: no such model file"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "nonsense"], "--device "),
])
def test_bad_options_are_one_line(artifact, extra, message):
    assert single_error_line(invoke(*verify_args(artifact, *extra))).startswith(f"squeeze: error: {message}")
