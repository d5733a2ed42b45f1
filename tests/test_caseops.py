"""CaseOps byte sidecars (Parameter Golf records from 2026-04-18 on): `fineweb_val_bytes_*.bin` beside the token
shards, one original-text byte count per token, which BPB divides by instead of the tokenizer's table. On the
fixture's real validation text: a sidecar that holds the table's own counts scores exactly as the table, and any
other counts are taken at each target's position; globs never read sidecars as tokens; sidecars beside the shards
are found; the report says which bytes were counted; torchrun sums them as one process does."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from squeeze.calibrate import calibration_for
from squeeze.data import read_shard
from squeeze.errors import SqueezeError
from squeeze.verify import verify
from squeeze.verify.bpb import bits_per_byte, byte_table, load_tokenizer

from conftest import CKPT, FIXTURES, ROOT
from test_verify_cli import LAUNCHER_FAILURES, artifact, free_port, invoke  # noqa: F401 (artifact: a fixture)
from test_verify_cli import single_error_line as error_line

pytest.importorskip("sentencepiece")

VAL = str(FIXTURES / "val_000000.bin")
TOKENIZER = str(FIXTURES / "tokenizer_1024_bpe.model")
QUICK = dict(seq_len=256, max_tokens=2048, batch_size=4, device="cpu")  # 8 windows of 256
QUICK_ARGS = ["--seq-len", "256", "--max-tokens", "2048", "--batch-size", "2", "--device", "cpu"]


def write_shard(path: Path, values) -> Path:
    """A shard in the challenge's layout: 256 int32 header (magic, version, count), then uint16 values."""
    values = np.asarray(values)
    assert values.min() >= 0 and values.max() < 1 << 16
    header = np.zeros(256, dtype="<i4")
    header[:3] = [20240520, 1, values.size]
    path.write_bytes(header.tobytes() + values.astype("<u2").tobytes())
    return path


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return read_shard(VAL)


@pytest.fixture(scope="module")
def lut_counts(tokens) -> np.ndarray:
    """Each token's bytes as the tokenizer's table counts them when it is a target (the first token never is: 0)."""
    table = byte_table(load_tokenizer(TOKENIZER))
    t = torch.from_numpy(tokens)
    counts = np.zeros(tokens.size, dtype=np.int64)
    counts[1:] = table.count(t[:-1], t[1:]).numpy()
    return counts


def same_scores(a, b):
    for x, y in ((a.original, b.original), (a.decoded, b.decoded)):
        assert (x.loss_nats, x.tokens, x.bytes, x.val_bpb) == (y.loss_nats, y.tokens, y.bytes, y.val_bpb)


# ---------------------------------------------------------------- values

@pytest.mark.parametrize("stride", [None, 96])
def test_a_sidecar_of_the_tables_counts_scores_exactly_as_the_table(artifact, lut_counts, tmp_path, stride):
    sidecar = write_shard(tmp_path / "val_bytes_000000.bin", lut_counts)
    lut = verify(artifact, CKPT, VAL, TOKENIZER, stride=stride, val_bytes="none", **QUICK)
    side = verify(artifact, CKPT, VAL, TOKENIZER, stride=stride, val_bytes=str(sidecar), **QUICK)
    same_scores(side, lut)
    assert lut.byte_source.label == "tokenizer LUT" and side.byte_source.label == f"sidecar {sidecar}"
    assert lut.original.tokens == 2048 and lut.original.bytes == int(lut_counts[1:2049].sum())
    assert 2.0 < lut.original.val_bpb < 3.0  # a real score: the fixture's ~2.1-2.4 on this prefix


@pytest.mark.parametrize("stride", [None, 96])
def test_counts_are_taken_at_each_targets_position(artifact, lut_counts, tmp_path, stride):
    lut = verify(artifact, CKPT, VAL, TOKENIZER, stride=stride, val_bytes="none", **QUICK)
    doubled = write_shard(tmp_path / "doubled_bytes_000000.bin", 2 * lut_counts)
    twice = verify(artifact, CKPT, VAL, TOKENIZER, stride=stride, val_bytes=str(doubled), **QUICK)
    for x, y in ((twice.original, lut.original), (twice.decoded, lut.decoded)):
        assert x.loss_nats == y.loss_nats and x.bytes == 2 * y.bytes and x.val_bpb == y.val_bpb / 2
    assert twice.drift_bpb == pytest.approx(lut.drift_bpb / 2, rel=1e-12)
    assert torch.equal(twice.original.windows[:, 2], 2 * lut.original.windows[:, 2])  # per window too

    # counts unrelated to the tokens (position mod 7, plus 1): the bytes are exactly those of targets 1..2048
    ramp = np.arange(lut_counts.size) % 7 + 1
    odd = verify(artifact, CKPT, VAL, TOKENIZER, stride=stride,
                 val_bytes=str(write_shard(tmp_path / "ramp_bytes_000000.bin", ramp)), **QUICK)
    assert odd.original.bytes == int(ramp[1:2049].sum()) and odd.original.loss_nats == lut.original.loss_nats
    assert odd.original.val_bpb == bits_per_byte(lut.original.loss_nats, int(ramp[1:2049].sum()))


# ---------------------------------------------------------------- globs

@pytest.fixture()
def caseops_dir(tmp_path, tokens, lut_counts):
    """A CaseOps data folder: the first 4,097 tokens as fineweb_val_000000.bin, a sidecar of twice the table's
    counts beside it (so that a result tells which bytes it counted), and a training shard."""
    write_shard(tmp_path / "fineweb_val_000000.bin", tokens[:4097])
    write_shard(tmp_path / "fineweb_val_bytes_000000.bin", 2 * lut_counts[:4097])
    write_shard(tmp_path / "fineweb_train_000000.bin", tokens[4097:8194])
    return tmp_path


def test_a_glob_of_tokens_and_sidecars_is_an_error(artifact, caseops_dir):
    both = f"{caseops_dir}/fineweb_val_*.bin"
    assert error_line(invoke("verify", artifact, "--ckpt", CKPT, "--val", both, "--tokenizer", TOKENIZER)) == (
        f"squeeze: error: {both}: matches token shards ({caseops_dir}/fineweb_val_000000.bin) and CaseOps byte "
        f"sidecars ({caseops_dir}/fineweb_val_bytes_000000.bin) (pass them with --val-bytes); give a glob of the "
        f"token shards only, e.g. '{caseops_dir}/fineweb_val_[0-9]*.bin'")
    only = f"{caseops_dir}/fineweb_val_bytes_*.bin"
    assert error_line(invoke("verify", artifact, "--ckpt", CKPT, "--val", only, "--tokenizer", TOKENIZER)) == (
        f"squeeze: error: {only}: matches only CaseOps byte sidecars ({caseops_dir}/fineweb_val_bytes_000000.bin): "
        f"these are byte counts, not tokens (pass them with --val-bytes); give the token shards, e.g. "
        f"'fineweb_val_[0-9]*.bin'")


def test_calibration_globs_never_read_sidecars_as_tokens(fixture_sd, caseops_dir):
    everything = f"{caseops_dir}/*.bin"
    with pytest.raises(SqueezeError) as e:
        calibration_for(fixture_sd, calib=everything, seq_len=64, n_tokens=256, device="cpu")
    assert str(e.value).startswith(f"{everything}: matches token shards ({caseops_dir}/fineweb_train_000000.bin) "
                                   f"and CaseOps byte sidecars ({caseops_dir}/fineweb_val_bytes_000000.bin); ")
    with pytest.raises(SqueezeError, match="these are byte counts, not tokens"):
        calibration_for(fixture_sd, calib=f"{caseops_dir}/*_bytes_*.bin", seq_len=64, n_tokens=256, device="cpu")
    ok = calibration_for(fixture_sd, calib=f"{caseops_dir}/fineweb_train_*.bin", seq_len=64, n_tokens=256,
                         device="cpu")
    assert ok.source == f"256 tokens of {caseops_dir}/fineweb_train_*.bin"


def test_sidecar_errors_are_one_line(artifact, caseops_dir, lut_counts):
    val = f"{caseops_dir}/fineweb_val_[0-9]*.bin"
    short = write_shard(caseops_dir / "short_bytes.bin", lut_counts[:4096])
    assert error_line(invoke("verify", artifact, "--ckpt", CKPT, "--val", val, "--tokenizer", TOKENIZER,
                             "--val-bytes", short, "--max-tokens", "256", "--seq-len", "256")) == (
        f"squeeze: error: --val-bytes {short}: the byte sidecars hold 4,096 values but --val {val} holds 4,097 "
        f"tokens; they must match one for one")
    assert error_line(invoke("verify", artifact, "--ckpt", CKPT, "--val", val, "--tokenizer", TOKENIZER,
                             "--val-bytes", f"{caseops_dir}/nothing_*.bin")) == (
        f"squeeze: error: --val-bytes {caseops_dir}/nothing_*.bin: no byte sidecar shards match")
    assert error_line(invoke("verify", artifact, "--ckpt", CKPT, "--val", val, "--tokenizer", TOKENIZER,
                             "--val-bytes", val)) == (
        f"squeeze: error: --val-bytes {val}: matches the token shard {caseops_dir}/fineweb_val_000000.bin of --val "
        f"{val}; give the byte sidecars, e.g. 'fineweb_val_bytes_*.bin'")
    # a second token shard without its sidecar: neither the sidecars nor the table would be right for all of them
    shutil.copy(caseops_dir / "fineweb_val_000000.bin", caseops_dir / "fineweb_val_000001.bin")
    assert error_line(invoke("verify", artifact, "--ckpt", CKPT, "--val", val, "--tokenizer", TOKENIZER)) == (
        f"squeeze: error: {val}: CaseOps byte sidecars lie beside 1 of its 2 token shards (none for "
        f"{caseops_dir}/fineweb_val_000001.bin); give --val-bytes GLOB, or --val-bytes none for the tokenizer's "
        f"byte table")


# ---------------------------------------------------------------- found beside the shards, and the report

def test_sidecars_beside_the_shards_are_found_and_reported(artifact, caseops_dir):
    val = f"{caseops_dir}/fineweb_val_[0-9]*.bin"
    found = invoke("verify", artifact, "--ckpt", CKPT, "--val", val, "--tokenizer", TOKENIZER, *QUICK_ARGS)
    assert found.exit_code == 0, found.output
    lines = found.stdout.splitlines()
    assert lines[1] == f"bytes: sidecar {caseops_dir}/fineweb_val_bytes_[0-9]*.bin (found beside the token shards)"
    report_path = Path(f"{artifact}.verify.json")
    report = json.loads(report_path.read_text())
    assert report["settings"]["bytes"] == f"sidecar {caseops_dir}/fineweb_val_bytes_[0-9]*.bin"
    assert report["settings"]["val_bytes"] == f"{caseops_dir}/fineweb_val_bytes_[0-9]*.bin"
    assert report["settings"]["val_bytes_files"] == [f"{caseops_dir}/fineweb_val_bytes_000000.bin"]
    assert report["settings"]["val_bytes_found"] is True
    inspected = invoke("inspect", artifact)
    assert inspected.exit_code == 0, inspected.output
    assert f"tokens of {val}, bytes: sidecar {caseops_dir}/fineweb_val_bytes_[0-9]*.bin: {report_path})" \
        in inspected.stdout

    lut = invoke("verify", artifact, "--ckpt", CKPT, "--val", val, "--tokenizer", TOKENIZER, *QUICK_ARGS,
                 "--val-bytes", "none", "--json", "--no-report")
    assert lut.exit_code == 0, lut.output
    table = json.loads(lut.stdout)
    assert table["settings"]["bytes"] == "tokenizer LUT" and table["settings"]["val_bytes"] is None
    assert table["settings"]["val_bytes_files"] == [] and table["settings"]["val_bytes_found"] is False
    for weights in ("original", "decoded"):  # the found sidecar holds twice the table's counts
        assert report[weights]["bytes"] == 2 * table[weights]["bytes"]
        assert report[weights]["val_bpb"] == table[weights]["val_bpb"] / 2
        assert report[weights]["val_loss"] == table[weights]["val_loss"]

    given = invoke("verify", artifact, "--ckpt", CKPT, "--val", val, "--tokenizer", TOKENIZER, *QUICK_ARGS,
                   "--val-bytes", f"{caseops_dir}/fineweb_val_bytes_*.bin", "--no-report")
    assert given.exit_code == 0, given.output
    assert given.stdout.splitlines()[1] == f"bytes: sidecar {caseops_dir}/fineweb_val_bytes_*.bin"
    assert given.stdout.splitlines()[3].split()[2] == found.stdout.splitlines()[3].split()[2]  # original val_bpb


def test_an_older_report_without_bytes_reads_as_the_table(artifact, tmp_path):
    from squeeze.verify import record
    doc = {"report": record.KIND, "version": record.VERSION, "artifact": {"sha256": "0" * 64},
           "drift": {"val_loss": 0.001, "val_bpb": 0.0005}, "decoded": {"tokens": 512}, "settings": {"val": VAL}}
    path = tmp_path / "old.verify.json"
    path.write_text(json.dumps(doc))
    assert record.read(path).bytes == "tokenizer LUT"


# ---------------------------------------------------------------- torchrun

@pytest.mark.slow
def test_torchrun_two_gloo_processes_sum_sidecar_bytes_as_one(artifact, lut_counts, tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"
    ramp = write_shard(tmp_path / "ramp_bytes_000000.bin", np.arange(lut_counts.size) % 7 + 1)
    args = ["verify", str(artifact), "--ckpt", str(CKPT), "--val", VAL, "--tokenizer", TOKENIZER,
            "--val-bytes", str(ramp), "--stride", "192", *QUICK_ARGS, "--json", "--no-report"]
    one = subprocess.run([sys.executable, "-m", "squeeze", *args], capture_output=True, text=True, cwd=ROOT, env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "squeeze", *args],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    if two.returncode != 0 and any(marker in two.stderr for marker in LAUNCHER_FAILURES):
        pytest.skip(f"the distributed launcher could not start: {two.stderr.strip().splitlines()[-1]}")
    assert two.returncode == 0, two.stderr
    single, multi = json.loads(one.stdout), json.loads(two.stdout)
    assert multi["settings"] == {**single["settings"], "world_size": 2}
    assert single["settings"]["bytes"] == f"sidecar {ramp}"
    for weights in ("original", "decoded"):
        for key in ("val_loss", "val_bpb", "tokens", "bytes"):
            assert multi[weights][key] == single[weights][key], (weights, key)
    ramp_values = np.arange(lut_counts.size) % 7 + 1
    assert single["original"]["tokens"] == 2048 and single["original"]["bytes"] == int(ramp_values[1:2049].sum())
