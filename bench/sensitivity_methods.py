"""Sensitivities from one backward pass against the noise probe (issue 14): their time, how they rank the tensors,
and, what matters, the drift of the budget allocations they give, measured by verify at equal bytes.

    python bench/sensitivity_methods.py --ckpt fixtures/pgolf_4x256.pt --calib 'train_*.bin'
        [--bpp 3,3.5,4,5] [--val fixtures/val_000000.bin] [--seq-len 256] [--seeds 0,1]

Both methods measure on the same fixed batch (the first 16 calibration windows); the Hessians are shared. The
Fisher draws its labels from the model, so `--seeds` repeats it with other draws: the spread of its drift across
seeds is the noise of the comparison. Every matrix of more than 4,096 elements is left to the budget (as
bench/budget_vs_record.py --quantize-small), codec auto (brotli or rans per section).
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import squeeze  # noqa: E402
from squeeze import calibrate  # noqa: E402
from squeeze.recipe import parse  # noqa: E402
from squeeze.verify import Verifier, models  # noqa: E402
from squeeze.verify.stream import load_stream  # noqa: E402

RECIPE = ('[defaults]\nbits = 6\nclip = "std"\nclip_std_k = 8.0\n'
          '[keep_float]\nmax_numel = 4096\ncontrol_dtype = "fp16"\nsmall_dtype = "fp16"\n'
          '[encode]\ncodec = "auto"\ncandidates = ["brotli", "rans"]\n')


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--calib", required=True, help="training token shards (never the validation set)")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--val", default=str(ROOT / "fixtures/val_000000.bin"))
    ap.add_argument("--tokenizer", default=str(ROOT / "fixtures/tokenizer_1024_bpe.model"))
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--bpp", default="3,3.5,4,5")
    ap.add_argument("--seeds", default="0,1", help="label draws of the Fisher")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    sd = torch.load(args.ckpt, map_location="cpu", weights_only=True)
    params = sum(t.numel() for t in sd.values())
    recipe = parse(RECIPE, "budget")
    names = squeeze.budget.budget_names(sd, recipe)
    net = models.resolve("pgolf", {}, "")(sd, "checkpoint").eval()
    tokens = calibrate.windows_of(load_stream(args.calib, 1024, args.calib_tokens), args.seq_len,
                                  args.calib_tokens)
    hessians, _ = calibrate.collect_hessians(net, [tokens[i:i + 8] for i in range(0, len(tokens), 8)],
                                             names=list(sd))
    batch = tokens[:calibrate.FISHER_SEQUENCES]
    measured, seconds = {}, {}
    t = time.perf_counter()
    measured["probe"] = calibrate.sensitivities(net, batch, names, method="probe")
    seconds["probe"] = time.perf_counter() - t
    params_of = calibrate.checkpoint_parameters(net, list(sd))
    for seed in (int(s) for s in args.seeds.split(",")):
        t = time.perf_counter()
        raw = calibrate.fisher(params_of, names, [r[:, :-1] for r in calibrate.rows_of(batch)], net, seed=seed)
        measured[f"fisher seed {seed}"] = calibrate.floored(raw)
        seconds[f"fisher seed {seed}"] = time.perf_counter() - t
    print(f"{args.ckpt}: {params:,} params, {len(names)} tensors decided by the budget; Hessians from "
          f"{tokens.numel():,} tokens of {args.calib}; sensitivities on {batch.shape[0]} windows of {args.seq_len}")
    probe = np.array([measured["probe"][n] for n in names])
    ranks = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    for label, sens in measured.items():
        v = np.array([sens[n] for n in names])
        rho = np.corrcoef(ranks(v), ranks(probe))[0, 1]
        print(f"  {label:<14} {seconds[label]:7.1f} s   Spearman vs probe {rho:.3f}   median ratio to probe "
              f"{np.median(v / probe):.3f}")

    tmp = Path(tempfile.mkdtemp(prefix="squeeze-sens-"))
    verifier = Verifier(args.ckpt, args.val, args.tokenizer, seq_len=args.seq_len, device="cpu")
    print(f"\n{'bits/param':>10} " + " ".join(f"{label:>22}" for label in measured))
    for bpp in (float(x) for x in args.bpp.split(",")):
        budget = int(bpp * params / 8)
        cells = []
        for label, sens in measured.items():
            blob = squeeze.compile_to_budget(sd, recipe, budget, sensitivities=sens, hessians=hessians).blob
            path = tmp / f"{label.replace(' ', '_')}_{bpp}.sqz"
            path.write_bytes(blob)
            r = verifier.verify(path)
            cells.append(f"{r.drift_bpb:+.5f} ({len(blob):,} B)")
        print(f"{bpp:>10g} " + " ".join(f"{c:>22}" for c in cells), flush=True)
    print("(val_bpb drift of the decoded artifact, measured by verify; bytes in brackets)")


if __name__ == "__main__":
    main()
