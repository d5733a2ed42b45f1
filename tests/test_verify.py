"""squeeze.verify as a library: BPB as the challenge computes it, checked against independent computations; windows;
models (built-in, the user's own); the progress bar; CUDA (skipped without a GPU)."""
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import squeeze
from squeeze.data import read_shard
from squeeze.errors import SqueezeError
from squeeze.models.pgolf import GPT
from squeeze.recipe import parse
from squeeze.verify import Verifier, verify
from squeeze.verify.bpb import byte_table, load_tokenizer
from squeeze.verify.eval import score
from squeeze.verify.progress import ProgressBar
from squeeze.verify.windows import plan_windows

from conftest import CKPT, FIXTURES, RECIPES

spm = pytest.importorskip("sentencepiece")

VAL = str(FIXTURES / "val_000000.bin")
TOKENIZER = FIXTURES / "tokenizer_1024_bpe.model"
PREFIX = 4096  # predictions scored by the quick tests: 16 windows of 256


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(TOKENIZER))


@pytest.fixture(scope="module")
def tokens():
    return read_shard(VAL)


@pytest.fixture(scope="module")
def model(fixture_sd):
    return GPT.from_state_dict({k: v.float() for k, v in fixture_sd.items()}).eval()


@pytest.fixture(scope="module")
def int8_artifact(fixture_sd, tmp_path_factory):
    path = tmp_path_factory.mktemp("verify") / "int8.sqz"
    path.write_bytes(squeeze.compile(fixture_sd, squeeze.Recipe.load(RECIPES / "int8-baseline.toml")))
    return path


@pytest.fixture(scope="module")
def prefix_result(int8_artifact):
    return verify(int8_artifact, CKPT, VAL, TOKENIZER, seq_len=256, max_tokens=PREFIX, device="cpu")


def piece_bytes(sp, prev: int, token: int) -> int:
    """The challenge's byte rule, written out for one token, without squeeze's tables."""
    def silent(t):
        return sp.is_control(t) or sp.is_unknown(t) or sp.is_unused(t)
    if silent(token):
        return 0
    if sp.is_byte(token):
        return 1
    piece = sp.id_to_piece(token)
    space = piece[0] == "\u2581"
    return len(piece[1:].encode("utf-8") if space else piece.encode("utf-8")) + int(space and not silent(prev))


@torch.no_grad()
def reference(model, stream, seq_len: int, sp) -> tuple:
    """val_loss and val_bpb the straightforward way: one window at a time, float64 log-softmax, bytes token by token."""
    loss, n_tokens, n_bytes = 0.0, 0, 0
    for w in range((len(stream) - 1) // seq_len):
        x = [int(t) for t in stream[w * seq_len:(w + 1) * seq_len]]
        y = [int(t) for t in stream[w * seq_len + 1:(w + 1) * seq_len + 1]]
        logp = torch.log_softmax(model(torch.tensor([x]))[0].double(), dim=-1)
        for i in range(seq_len):
            loss -= logp[i, y[i]].item()
            n_bytes += piece_bytes(sp, x[i], y[i])
            n_tokens += 1
    return loss / n_tokens, loss / math.log(2) / n_bytes


def test_byte_table_counts_the_bytes_of_the_decoded_text(sp, tokens):
    """Over whole documents, the per-token byte counts add up to the UTF-8 length of the text the tokenizer decodes,
    and the per-token rule written out in this test agrees token by token."""
    table = byte_table(load_tokenizer(TOKENIZER))
    ids = torch.from_numpy(tokens)
    counts = table.count(ids[:-1], ids[1:])
    assert int(counts.sum()) == sum(len(sp.decode(doc).encode("utf-8")) for doc in documents(tokens))
    assert counts[:3000].tolist() == [piece_bytes(sp, int(a), int(b)) for a, b in zip(tokens[:3000], tokens[1:3001])]
    assert table.count(torch.tensor([1]), ids[1:2]).item() == piece_bytes(sp, 1, int(tokens[1]))  # after BOS


def documents(tokens) -> list:
    bos = [i for i, t in enumerate(tokens.tolist()) if t == 1] + [len(tokens)]
    assert bos[0] == 0 and len(bos) == 3  # the fixture: Macbeth, then part of The Tempest
    return [tokens[a + 1:b].tolist() for a, b in zip(bos, bos[1:])]


@pytest.mark.slow
def test_original_bpb_reproduces_the_fixture_record(model, tokens):
    """fixtures/pgolf_4x256.json: val_loss 3.566734, val_bpb 2.129402 (fp32, 256-token windows, all 65,536)."""
    table = byte_table(load_tokenizer(TOKENIZER))
    result = score(model, torch.from_numpy(tokens), table, plan_windows(len(tokens), 256), batch_size=32)
    assert result.tokens == 65_536
    assert abs(result.val_loss - 3.566734) < 1e-6 and abs(result.val_bpb - 2.129402) < 1e-6


def test_verify_equals_a_plain_loop(prefix_result, model, tokens, sp, int8_artifact):
    loss, bpb = reference(model, tokens[:PREFIX + 1], 256, sp)
    assert prefix_result.original.tokens == PREFIX
    assert prefix_result.original.bytes == sum(piece_bytes(sp, int(a), int(b))
                                               for a, b in zip(tokens[:PREFIX], tokens[1:PREFIX + 1]))
    assert abs(prefix_result.original.val_loss - loss) < 1e-6 and abs(prefix_result.original.val_bpb - bpb) < 1e-6
    # the decoded side equals the library loader's weights, scored the same way
    decoded = GPT.from_state_dict({k: v.float() for k, v in squeeze.load(int8_artifact).items()}).eval()
    loss, bpb = reference(decoded, tokens[:PREFIX + 1], 256, sp)
    assert abs(prefix_result.decoded.val_bpb - bpb) < 1e-6
    assert 0 < prefix_result.drift_bpb < 0.01  # int8 moves it, a little
    assert prefix_result.drift_bpb == prefix_result.decoded.val_bpb - prefix_result.original.val_bpb
    assert prefix_result.artifact_bytes == int8_artifact.stat().st_size and prefix_result.params == 2_101_776


def test_per_window_sums_add_up_to_the_score_and_equal_each_windows_own(prefix_result, model, tokens, sp):
    """Score.windows: each window's loss, tokens and bytes; they add up to the totals, and a window's row equals
    the plain loop over that window alone."""
    for side in (prefix_result.original, prefix_result.decoded):
        w = side.windows
        assert w.shape == (PREFIX // 256, 3) and w.dtype == torch.float64
        assert abs(float(w[:, 0].sum()) - side.loss_nats) < 1e-9 * side.loss_nats
        assert int(w[:, 1].sum()) == side.tokens and int(w[:, 2].sum()) == side.bytes
    third = tokens[2 * 256:3 * 256 + 1]
    loss, _ = reference(model, third, 256, sp)
    row = prefix_result.original.windows[2]
    assert abs(float(row[0]) / 256 - loss) < 1e-6 and int(row[1]) == 256
    assert int(row[2]) == sum(piece_bytes(sp, int(a), int(b)) for a, b in zip(third[:-1], third[1:]))


def test_bootstrap_of_drift_is_paired_centred_and_deterministic(prefix_result):
    """The interval holds the measured drift, is reproducible for a seed, and the same result twice gives the same
    drift in every resample (a ratio of two drifts of one artifact is exactly 1: the resamples are paired)."""
    from squeeze.verify import bootstrap_drifts
    lo, hi = prefix_result.drift_interval()
    assert lo < prefix_result.drift_bpb < hi and hi - lo > 0
    assert prefix_result.drift_interval() == (lo, hi)
    rows = bootstrap_drifts([prefix_result, prefix_result], samples=200, seed=3)
    assert rows.shape == (200, 2) and np.array_equal(rows[:, 0], rows[:, 1])
    assert abs(float(np.median(rows[:, 0])) - prefix_result.drift_bpb) < (hi - lo) / 2


INT4_RTN = '[defaults]\nbits = 4\nclip = "mse"\nmethod = "rtn"\n[encode]\ncodec = "rans"\n'


def test_mirror_splits_the_drift_into_its_even_and_odd_parts(fixture_sd, tokens, sp, tmp_path):
    """mirror=True scores 2·W − Ŵ as well: that score equals the plain loop on those weights built here, the even and
    odd parts add up to the drift exactly, the original and decoded scores are those of a run without it, and the
    even part of a coarse (int4) artifact is positive: the curvature term of a trained model's loss."""
    path = tmp_path / "int4.sqz"
    path.write_bytes(squeeze.compile(fixture_sd, parse(INT4_RTN)))
    plain = verify(path, CKPT, VAL, TOKENIZER, seq_len=256, max_tokens=PREFIX, device="cpu")
    r = verify(path, CKPT, VAL, TOKENIZER, seq_len=256, max_tokens=PREFIX, device="cpu", mirror=True)
    # a Verifier scores the checkpoint once and gives each artifact verify()'s figures
    verifier = Verifier(CKPT, VAL, TOKENIZER, seq_len=256, max_tokens=PREFIX, device="cpu")
    again = [verifier.verify(path, mirror=True), verifier.verify(path)]
    assert again[0].original is again[1].original and again[1].mirrored is None
    for got, want in ((again[0].mirrored, r.mirrored), (again[1].decoded, plain.decoded),
                      (again[1].original, plain.original)):
        assert (got.loss_nats, got.tokens, got.bytes) == (want.loss_nats, want.tokens, want.bytes)
    assert plain.mirrored is None and plain.drift_even_bpb is None and plain.drift_odd_bpb is None
    for a, b in ((r.original, plain.original), (r.decoded, plain.decoded)):
        assert (a.loss_nats, a.tokens, a.bytes) == (b.loss_nats, b.tokens, b.bytes)
    decoded = squeeze.load(path)
    flipped = GPT.from_state_dict({k: 2 * fixture_sd[k].float() - v.float() for k, v in decoded.items()}).eval()
    loss, bpb = reference(flipped, tokens[:PREFIX + 1], 256, sp)
    assert abs(r.mirrored.val_loss - loss) < 1e-6 and abs(r.mirrored.val_bpb - bpb) < 1e-6
    assert r.drift_even_bpb == pytest.approx((r.decoded.val_bpb + r.mirrored.val_bpb) / 2 - r.original.val_bpb)
    assert r.drift_even_bpb + r.drift_odd_bpb == pytest.approx(r.drift_bpb, abs=1e-12)
    assert r.drift_even_bpb > 0.005
    doc = r.to_dict()
    assert doc["drift"]["even_val_bpb"] == r.drift_even_bpb and doc["mirrored"]["tokens"] == PREFIX
    assert "mirrored" not in plain.to_dict() and "even_val_bpb" not in plain.to_dict()["drift"]
    # the bootstrap of each part is centred on it; parts add up in every resample; no part without the mirror
    from squeeze.verify import bootstrap_drifts
    rows = {part: bootstrap_drifts([r], samples=200, seed=1, part=part)[:, 0] for part in ("measured", "even", "odd")}
    assert np.allclose(rows["even"] + rows["odd"], rows["measured"], atol=1e-12)
    lo, hi = r.drift_interval(part="even")
    assert lo < r.drift_even_bpb < hi
    with pytest.raises(SqueezeError, match="the odd part needs results scored with mirror=True"):
        bootstrap_drifts([plain], part="odd")
    with pytest.raises(SqueezeError, match="part 'curvature'"):
        bootstrap_drifts([r], part="curvature")


def test_sliding_window_sums_count_each_prediction_once(model, tokens):
    table, stream = byte_table(load_tokenizer(TOKENIZER)), torch.from_numpy(tokens[:1025])
    got = score(model, stream, table, plan_windows(len(stream), 64, stride=16), batch_size=8)
    assert int(got.windows[:, 1].sum()) == got.tokens == 1024 and int(got.windows[:, 2].sum()) == got.bytes
    assert abs(float(got.windows[:, 0].sum()) - got.loss_nats) < 1e-9 * got.loss_nats
    assert (got.windows[1:, 1] <= 16).all() and int(got.windows[0, 1]) == 64  # later windows score their stride


# ---------------------------------------------------------------- windows

@pytest.mark.parametrize("n_tokens,seq_len,stride", [(100, 16, 16), (100, 16, 5), (101, 16, 1), (17, 16, 4),
                                                     (1000, 64, 48), (65, 64, 64)])
def test_sliding_windows_score_every_prediction_once_with_context(n_tokens, seq_len, stride):
    plan = plan_windows(n_tokens, seq_len, stride)
    assert (plan.starts >= 0).all() and (plan.starts + seq_len <= n_tokens - 1).all()  # full windows, in the stream
    scored = np.concatenate([np.arange(s + f, s + seq_len) for s, f in zip(plan.starts, plan.score_from)])
    assert sorted(scored.tolist()) == list(range(n_tokens - 1))  # each prediction exactly once
    context = np.concatenate([np.arange(f, seq_len) + 1 for f in plan.score_from[1:]] or [np.zeros(0)])
    assert (context >= seq_len - stride + 1).all()
    assert plan.scored_tokens == n_tokens - 1


def test_non_overlapping_windows_drop_the_tail_like_the_challenge():
    plan = plan_windows(1000, 64)
    assert plan.starts.tolist() == [64 * k for k in range(15)] and (plan.score_from == 0).all()
    same = plan_windows(1025, 64, stride=64)  # stride = seq_len and no tail: the same windows
    assert same.starts.tolist() == plan_windows(1025, 64).starts.tolist() and (same.score_from == 0).all()


@pytest.mark.parametrize("stride", [1, 7, 32])
@torch.no_grad()
def test_sliding_bpb_equals_a_brute_force_reference(model, tokens, stride):
    """Per prediction, by the definition: scored by the window of the stride grid whose last `stride` positions hold
    it (the first window: all of its positions), the last window moved back to the stream's end; the model reads
    that window's tokens up to the prediction."""
    stream, seq_len = tokens[:97], 32
    predictions = len(stream) - 1
    loss, n_bytes = 0.0, 0
    table = byte_table(load_tokenizer(TOKENIZER))
    for t in range(predictions):
        start = 0 if t < seq_len else -(-(t + 1 - seq_len) // stride) * stride
        if start + seq_len > predictions:
            start = predictions - seq_len
        logits = model(torch.from_numpy(stream[start:t + 1])[None])[0, -1]
        loss += F.cross_entropy(logits[None].double(), torch.tensor([int(stream[t + 1])])).item()
        n_bytes += int(table.count(torch.tensor([int(stream[t])]), torch.tensor([int(stream[t + 1])])))
    got = score(model, torch.from_numpy(stream), table, plan_windows(len(stream), seq_len, stride), batch_size=8)
    assert got.tokens == predictions and got.bytes == n_bytes
    assert abs(got.loss_nats - loss) < 1e-4 and abs(got.val_bpb - loss / math.log(2) / n_bytes) < 1e-6


def test_sliding_window_bpb_is_no_worse_on_the_fixture(model, tokens):
    table, stream = byte_table(load_tokenizer(TOKENIZER)), torch.from_numpy(tokens[:PREFIX + 1])
    flat = score(model, stream, table, plan_windows(len(stream), 256))
    sliding = score(model, stream, table, plan_windows(len(stream), 256, stride=64))
    assert sliding.tokens == flat.tokens == PREFIX and sliding.bytes == flat.bytes
    assert sliding.val_bpb < flat.val_bpb


# ---------------------------------------------------------------- models

FACTORY = '''
import torch
from squeeze.models.pgolf import GPT

SEEN = []

def build(state_dict, config):
    """The contract: (state_dict, config) -> nn.Module whose forward gives logits [B, T, V]."""
    SEEN.append(dict(config))
    return GPT.from_state_dict({k: v.float() for k, v in state_dict.items()}, **config)
'''


def test_user_model_from_a_file_and_from_a_module(tmp_path, monkeypatch, int8_artifact):
    (tmp_path / "my_arch.py").write_text(FACTORY)
    from_file = verify(int8_artifact, CKPT, VAL, TOKENIZER, model=f"{tmp_path / 'my_arch.py'}:build",
                       seq_len=256, max_tokens=1024, device="cpu")
    pgolf = verify(int8_artifact, CKPT, VAL, TOKENIZER, seq_len=256, max_tokens=1024, device="cpu")
    for mine, builtin in ((from_file.original, pgolf.original), (from_file.decoded, pgolf.decoded)):
        assert (mine.loss_nats, mine.tokens, mine.bytes) == (builtin.loss_nats, builtin.tokens, builtin.bytes)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "config.json"
    config.write_text('{"logit_softcap": 15.0}')
    from_module = verify(int8_artifact, CKPT, VAL, TOKENIZER, model="my_arch:build", model_config=config,
                         seq_len=256, max_tokens=1024, device="cpu")
    import my_arch
    assert my_arch.SEEN == [{"logit_softcap": 15.0}] * 2  # the original weights, then the decoded ones
    assert from_module.original.val_bpb != pgolf.original.val_bpb  # the config reached the model


def test_pgolf_model_config_overrides_and_unknown_keys(tmp_path, int8_artifact):
    config = tmp_path / "c.json"
    config.write_text('{"config": {"rope_base": 500.0}, "eval": {}}')  # fixture-record style, read under "config"
    changed = verify(int8_artifact, CKPT, VAL, TOKENIZER, model_config=config, seq_len=256, max_tokens=256,
                     device="cpu")
    default = verify(int8_artifact, CKPT, VAL, TOKENIZER, seq_len=256, max_tokens=256, device="cpu")
    assert changed.original.val_loss != default.original.val_loss
    config.write_text('{"rope_theta": 500.0}')
    with pytest.raises(SqueezeError, match=f"{config}: unknown key 'rope_theta' for --model pgolf"):
        verify(int8_artifact, CKPT, VAL, TOKENIZER, model_config=config, seq_len=256, max_tokens=256, device="cpu")


def test_fixture_record_is_a_valid_model_config(int8_artifact):
    result = verify(int8_artifact, CKPT, VAL, TOKENIZER, model_config=FIXTURES / "pgolf_4x256.json", seq_len=256,
                    max_tokens=256, device="cpu")
    assert result.original.tokens == 256


# ---------------------------------------------------------------- progress

class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_draws_only_on_a_terminal():
    tty, pipe = Terminal(), io.StringIO()
    for stream in (tty, pipe):
        bar = ProgressBar("original", 100, stream=stream)
        bar.advance(40)
        bar.advance(60)
        bar.close()
    assert "100.0%" in tty.getvalue() and "100/100 tokens" in tty.getvalue() and tty.getvalue().endswith("\033[K")
    assert pipe.getvalue() == ""
    quiet = Terminal()
    ProgressBar("original", 100, enabled=False, stream=quiet).advance(100)
    assert quiet.getvalue() == ""


# ---------------------------------------------------------------- CUDA

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_scores_close_to_cpu_fp32(int8_artifact, prefix_result):
    gpu = verify(int8_artifact, CKPT, VAL, TOKENIZER, seq_len=256, max_tokens=PREFIX, device="cuda")
    assert gpu.precision == "bf16 autocast" and gpu.original.tokens == PREFIX
    assert gpu.original.bytes == prefix_result.original.bytes
    assert abs(gpu.original.val_bpb - prefix_result.original.val_bpb) < 0.02  # bf16 vs fp32 arithmetic
    assert abs(gpu.drift_bpb - prefix_result.drift_bpb) < 0.01
