"""The same trained weights in the layouts the leaderboard records use compile as well as the baseline layout.

    python bench/architectures.py [--ckpt fixtures/pgolf_4x256.pt] [--val fixtures/val_000000.bin]

The fixture checkpoint in three layouts: the baseline's names (nn.Linear via F.linear, a tied head); the records'
3-D parameter banks (fixtures/banked_gpt.py: F.linear(x, bank[i].to(x.dtype)), forward(ids, targets) returns the
loss, logits from forward_logits); the banks inside a wrapper module (parameter names "model.…"). Each is compiled
with one recipe (every block matrix quantized) and GPTQ calibrated on the first half of the val shard, then scored by
`squeeze verify` on the second half (BPB as the challenge counts it, through the emitted decoder).

The records' other ways of using matrices come next (fixtures/record_gpt.py, one row per record at the fixture's
size, its new tensors seeded): 03-29 (banks, BigramHash and value-embedding projections and lookup tables, SmearGate,
XSA), 04-09 (per-layer matrices, loops, skip gates, GPT-J parallel blocks), 04-27 (banks, loops, skip gates, two-lane
parallel residual, sparse attention-output gate, smear gate). Their functions differ from the baseline's (new
tensors, untrained structure), so compare their drift, not their val_bpb; a lookup table (F.embedding) has no input
Hessian, so 03-29's two tables are round-to-nearest in the GPTQ count.

"before" rows reproduce what squeeze did before operand-level calibration and stacks (session of 2026-12-01): the
tied head had no Hessian (only nn.Linear inputs were hooked); a bank was one [L, R·C] matrix (one scale per layer
matrix) with no Hessian, and the banked model's forward(ids, targets) raised TypeError, so it compiled without
calibration. Figures go to BENCHMARKS.md by hand, with this command and the machine.
"""
import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import squeeze  # noqa: E402
from squeeze import calibrate, compiler  # noqa: E402
from squeeze.data import HEADER_INTS, SHARD_MAGIC, SHARD_VERSION, read_shard  # noqa: E402
from squeeze.recipe import parse  # noqa: E402
from squeeze.verify import verify  # noqa: E402

RECIPE = parse('name = "int5-all"\n[defaults]\nbits = 5\nclip = "std"\nclip_std_k = 5.0\n'
               '[keep_float]\nmax_numel = 4096\n[[rules]]\nmatch = "tok_emb.weight"\nbits = 6\nclip_std_k = 8.0\n',
               "int5-all.toml")


def write_shard(path: Path, tokens: np.ndarray):
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    path.write_bytes(header.tobytes() + tokens.astype("<u2").tobytes())


def fixture_module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"fixtures/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default=str(ROOT / "fixtures/pgolf_4x256.pt"))
    ap.add_argument("--val", default=str(ROOT / "fixtures/val_000000.bin"))
    ap.add_argument("--tokenizer", default=str(ROOT / "fixtures/tokenizer_1024_bpe.model"))
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    torch.manual_seed(0)
    banked_gpt, record_gpt = fixture_module("banked_gpt"), fixture_module("record_gpt")
    sd = torch.load(args.ckpt, map_location="cpu", weights_only=True)
    tokens = read_shard(args.val)
    half = tokens.size // 2
    calib_tokens = calibrate.windows_of(torch.from_numpy(tokens[:half]), args.seq_len, half)
    work = Path(tempfile.mkdtemp(prefix="squeeze-arch-"))
    write_shard(work / "heldout_000000.bin", tokens[half:])
    banked_sd = banked_gpt.bank_state_dict(sd)
    layouts = {
        "baseline": (sd, "pgolf", {}),
        "banked": (banked_sd, f"{ROOT / 'fixtures/banked_gpt.py'}:build", {}),
        "banked+wrapper": (banked_sd, f"{ROOT / 'fixtures/banked_gpt.py'}:build", {"wrap": True}),
    }
    for record in record_gpt.RECORDS:
        config = {"record": record}
        layouts[f"record {record}"] = (record_gpt.record_state_dict(sd, config), f"{ROOT / 'fixtures/record_gpt.py'}"
                                       f":build", config)
    builders = {f"{ROOT / 'fixtures/banked_gpt.py'}:build": banked_gpt.build,
                f"{ROOT / 'fixtures/record_gpt.py'}:build": record_gpt.build}
    rows = []
    for label, (state_dict, model_spec, config) in layouts.items():
        ckpt = work / f"{label}.pt"
        torch.save(state_dict, ckpt)
        if model_spec == "pgolf":
            from squeeze.models.pgolf import GPT
            net = GPT.from_state_dict({k: v.float() for k, v in state_dict.items()})
            forward = net
        else:
            net = builders[model_spec](state_dict, config)
            forward = net.forward_logits
        t0 = time.perf_counter()
        cal = calibrate.calibrate(net, calib_tokens, forward=forward, names=list(state_dict))
        t_cal = time.perf_counter() - t0
        runs = {"now": (state_dict, cal.hessians)}
        if label == "baseline":
            runs["before"] = (state_dict, {k: v for k, v in cal.hessians.items() if k != "tok_emb.weight"})
        elif label == "banked":
            flat = {k: v.reshape(v.shape[0], -1) if k in banked_gpt.BANKS else v for k, v in state_dict.items()}
            runs["before"] = (flat, {})
        for when, (weights, hessians) in runs.items():
            t0 = time.perf_counter()
            result = compiler.compile_state_dict(weights, RECIPE, hessians=hessians, calibration_skips=cal.skipped)
            t_compile = time.perf_counter() - t0
            blob = result.blob
            if weights is not state_dict:  # the old view of a bank: re-shaped back for the model
                decoded = squeeze.load(blob)
                blob = squeeze.compile_state_dict({k: decoded[k].reshape(state_dict[k].shape) for k in decoded},
                                                  parse('[defaults]\nscheme = "float"\nfloat_dtype = "keep"\n'
                                                        '[keep_float]\ncontrol_dtype = "keep"\nsmall_dtype = "keep"\n'
                                                        '[encode]\ncodec = "zlib"\n', "keep.toml")).blob
            artifact = work / f"{label}-{when}.sqz"
            artifact.write_bytes(blob)
            methods = compiler.methods_of(result.state)
            config_path = None
            if config:
                config_path = work / f"{label}.json"
                config_path.write_text(__import__("json").dumps(config))
            v = verify(str(artifact), str(ckpt), str(work / "heldout_*.bin"), args.tokenizer, model=model_spec,
                       model_config=str(config_path) if config_path else None, seq_len=args.seq_len, device="cpu")
            rows.append((label, when, len(result.blob), sum(m["method"] == "gptq" for m in methods), len(methods),
                         v.original.val_bpb, v.drift_bpb, t_cal, t_compile))
            print(f"{label:<15} {when:<6} {rows[-1][2]:>10,} B  gptq {rows[-1][3]:>2}/{rows[-1][4]:<2}  "
                  f"val_bpb {rows[-1][5]:.5f}  drift {rows[-1][6]:+.5f}  calib {t_cal:5.1f} s  "
                  f"compile {t_compile:5.1f} s", flush=True)


if __name__ == "__main__":
    main()
