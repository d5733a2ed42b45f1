"""inspect beside verify: `squeeze verify` leaves ARTIFACT.verify.json (atomically, naming the artifact by sha256),
and `squeeze inspect` shows the budget allocator's predicted loss increase next to the measured one; a stale or
malformed report is ignored with a one-line note, never an error."""
import hashlib
import json
import shutil

import pytest
import torch
from click.testing import CliRunner

import squeeze
from squeeze import calibrate, compiler
from squeeze.cli import main
from squeeze.data import read_shard
from squeeze.models.pgolf import GPT
from squeeze.recipe import parse

from conftest import CKPT, FIXTURES, RECIPES

pytest.importorskip("sentencepiece")

VAL = str(FIXTURES / "val_*.bin")
TOKENIZER = str(FIXTURES / "tokenizer_1024_bpe.model")
QUICK = ["--seq-len", "128", "--max-tokens", "512", "--batch-size", "4", "--device", "cpu"]  # 4 windows, 1 batch
# test_budget.py's recipe with zlib-1 instead of rans: the budget loop re-encodes several times, so the codec's speed
# is the test's; the matrices are left to the budget, the embedding pinned
RECIPE = parse('[defaults]\nbits = 6\nclip = "std"\nclip_std_k = 6.4\n[keep_float]\nmax_numel = 4096\n'
               '[encode]\ncodec = "zlib"\nzlib_level = 1\n[[rules]]\nmatch = "tok_emb.weight"\nbits = 8\n'
               'clip_std_k = 10.0\n', "drift-test")


@pytest.fixture(scope="module")
def budget_blob(fixture_sd) -> bytes:
    """A --budget artifact of the whole fixture (verify needs every tensor), calibrated on 256 tokens far from the
    512 verify scores: about 3 s."""
    stream = torch.from_numpy(read_shard(FIXTURES / "val_000000.bin"))[32768:32768 + 256]
    model = GPT.from_state_dict({k: v.float() for k, v in fixture_sd.items()})
    names = [k for k in fixture_sd if k.startswith("blocks.") and k.endswith(".weight")]
    calibration = calibrate.calibrate(model, calibrate.windows_of(stream, 64, 256), sensitivity_names=names)
    uniform = squeeze.compile(fixture_sd, RECIPE)
    return squeeze.compile_to_budget(fixture_sd, RECIPE, int(0.8 * len(uniform)),
                                      sensitivities=calibration.sensitivities).blob


@pytest.fixture(scope="module")
def verified(budget_blob, tmp_path_factory):
    """(artifact path, the CliRunner result of verifying it with the default report)."""
    artifact = tmp_path_factory.mktemp("drift") / "budget.sqz"
    artifact.write_bytes(budget_blob)
    return artifact, invoke("verify", artifact, "--ckpt", CKPT, "--val", VAL, "--tokenizer", TOKENIZER, *QUICK)


def invoke(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def inspect_ok(*args):
    """`squeeze inspect ...` that succeeded quietly: its stdout."""
    result = invoke("inspect", *args)
    assert result.exit_code == 0 and result.exception is None, (result.output, result.exception)
    assert result.stderr == ""
    return result.stdout


def drift_lines(text: str) -> list:
    """The summary's drift lines: everything after the 'parameters, ... bits/param overall' line."""
    lines = text.splitlines()
    last = next(i for i, line in enumerate(lines) if " bits/param overall; " in line)
    return lines[last + 1:]


def test_verify_writes_the_report_beside_the_artifact(verified):
    artifact, result = verified
    assert result.exit_code == 0, result.output
    path = artifact.parent / f"{artifact.name}.verify.json"
    assert result.stdout.splitlines()[-1] == f"report {path}"
    assert sorted(p.name for p in artifact.parent.iterdir()) == [artifact.name, path.name]  # no temporary left
    report = json.loads(path.read_text())
    blob = artifact.read_bytes()
    assert report["report"] == "squeeze verify report" and report["version"] == 1
    assert report["artifact"]["sha256"] == hashlib.sha256(blob).hexdigest()
    assert report["artifact"]["bytes"] == len(blob) and report["artifact"]["path"] == str(artifact)
    settings = report["settings"]
    assert settings["checkpoint"] == str(CKPT) and settings["val"] == VAL and settings["tokenizer"] == TOKENIZER
    assert settings["val_files"] == [str(FIXTURES / "val_000000.bin")]
    assert (settings["seq_len"], settings["stride"], settings["max_tokens"], settings["world_size"]) == \
        (128, None, 512, 1)
    for weights in ("original", "decoded"):
        assert report[weights]["tokens"] == 512 and report[weights]["val_loss"] > 0 and report[weights]["val_bpb"] > 0
    assert report["drift"]["val_loss"] == report["decoded"]["val_loss"] - report["original"]["val_loss"]
    assert report["drift"]["val_bpb"] == report["decoded"]["val_bpb"] - report["original"]["val_bpb"]


def test_inspect_shows_predicted_and_measured(verified):
    artifact, _ = verified
    report = json.loads((artifact.parent / f"{artifact.name}.verify.json").read_text())
    predicted = float(squeeze.inspect(artifact).meta["predicted_loss_increase"])
    assert predicted > 0
    measured, bpb = report["drift"]["val_loss"], report["drift"]["val_bpb"]
    text = inspect_ok(artifact)
    assert "blocks.0.mlp.fc.weight" in text and "int" in text  # the per-tensor allocation table is still there
    assert drift_lines(text) == [
        f"predicted loss increase {predicted:+.4g} nats/token (budget allocator, on calibration data)",
        f"measured loss increase  {measured:+.6f} nats/token, val_bpb {bpb:+.6f}; "
        f"measured/predicted {measured / predicted:.2f}",
        f"  (squeeze verify on 512 tokens of {VAL}: {artifact}.verify.json)"]

    drift = json.loads(inspect_ok(artifact, "--json"))["drift"]
    assert drift["predicted_loss"] == predicted and drift["measured_loss"] == measured
    assert drift["measured_bpb"] == bpb and drift["ratio"] == pytest.approx(measured / predicted)
    assert drift["tokens"] == 512 and drift["note"] is None


def test_stale_report_is_ignored_with_a_note(verified, fixture_sd, tmp_path):
    artifact, _ = verified
    # the artifact at that path changed since verify ran (here: an int8 compile, no budget, so no prediction)
    changed = tmp_path / "budget.sqz"
    changed.write_bytes(squeeze.compile(fixture_sd, squeeze.Recipe.load(RECIPES / "int8-baseline.toml")))
    shutil.copy(artifact.parent / f"{artifact.name}.verify.json", tmp_path / "budget.sqz.verify.json")
    note = f"verify report ignored: {changed}.verify.json: report is for another artifact (sha256 differs)"
    assert drift_lines(inspect_ok(changed)) == [note]
    drift = json.loads(inspect_ok(changed, "--json"))["drift"]
    assert drift["measured_loss"] is None and drift["note"] == note

    # a report of these bytes, named explicitly: measured only, with no prediction to compare it with
    report = json.loads((tmp_path / "budget.sqz.verify.json").read_text())
    report["artifact"]["sha256"] = hashlib.sha256(changed.read_bytes()).hexdigest()
    (tmp_path / "own.json").write_text(json.dumps(report))
    lines = drift_lines(inspect_ok(changed, "--verify-report", tmp_path / "own.json"))
    assert len(lines) == 2 and lines[0] == f"measured loss increase  {report['drift']['val_loss']:+.6f} nats/token, " \
                                           f"val_bpb {report['drift']['val_bpb']:+.6f}"

    # no report at all and no budget: the summary is as it always was
    (tmp_path / "budget.sqz.verify.json").unlink()
    assert drift_lines(inspect_ok(changed)) == []


@pytest.mark.parametrize("content,why", [
    (b'{"report": "squeeze verify report", "version": 1, "drift"', "not JSON"),
    (b"\xff\xfe\x00garbage", "not JSON"),
    (b"[1, 2]", 'no "report": "squeeze verify report"'),
    (b'{"report": "squeeze verify report", "version": 1, "artifact": {"sha256": "' + b"a" * 64 + b'"}}',
     "no drift.val_loss"),
    (b'{"report": "squeeze verify report", "version": 1, "artifact": {"sha256": 7}}', "artifact.sha256 is not"),
    (b'{"report": "squeeze verify report", "version": 99}', "verify report version 99"),
])
def test_malformed_report_is_a_note(budget_blob, tmp_path, content, why):
    artifact = tmp_path / "m.sqz"
    artifact.write_bytes(budget_blob)
    (tmp_path / "m.sqz.verify.json").write_bytes(content)
    lines = drift_lines(inspect_ok(artifact))
    assert lines[0].startswith("predicted loss increase ")
    assert lines[1] == lines[-1] and lines[1].startswith(f"verify report ignored: {artifact}.verify.json: ")
    assert why in lines[1]


def test_unreadable_report_paths_are_notes(budget_blob, tmp_path):
    artifact = tmp_path / "m.sqz"
    artifact.write_bytes(budget_blob)
    for path, why in ((tmp_path / "missing.json", "cannot read"), (tmp_path, "cannot read")):
        note = drift_lines(inspect_ok(artifact, "--verify-report", path))[-1]
        assert note.startswith(f"verify report ignored: {path}: {why}"), note
    # no default report: the prediction, and how to get the measurement
    assert drift_lines(inspect_ok(artifact))[-1] == \
        "measured loss increase  - (no verify report: run squeeze verify on this artifact)"


def test_report_options(budget_blob, tmp_path):
    artifact = tmp_path / "a.sqz"
    artifact.write_bytes(budget_blob)
    base = ["verify", artifact, "--ckpt", CKPT, "--val", VAL, "--tokenizer", TOKENIZER, *QUICK]
    # bad combinations fail at once, in one line, before any measuring
    for extra, message in ((["--report", tmp_path / "r.json", "--no-report"], "give --report PATH or --no-report"),
                           (["--report", tmp_path / "no" / "r.json"], f"--report {tmp_path / 'no' / 'r.json'}: "
                                                                       f"directory {tmp_path / 'no'} does not exist")):
        result = invoke(*base, *extra)
        assert result.exit_code == 2 and result.stdout == "" and result.stderr.strip().splitlines() == \
            [f"squeeze: error: {message}" + ("" if "directory" in message else ", not both")]

    result = invoke(*base, "--no-report", "--json")
    assert result.exit_code == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["a.sqz"]
    printed = json.loads(result.stdout)  # --json prints the document the report file holds
    assert printed["report"] == "squeeze verify report" and printed["max_drift"] is None

    result = invoke(*base, "--report", tmp_path / "r.json", "--json")
    assert result.exit_code == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["a.sqz", "r.json"]
    written = json.loads((tmp_path / "r.json").read_text())
    assert written.keys() == printed.keys() and written["artifact"] == printed["artifact"]
    assert drift_lines(inspect_ok(artifact, "--verify-report", tmp_path / "r.json"))[1].startswith("measured loss")
