"""Which grids the budget should price on a measurement (recipe [budget] measure_bits; squeeze/measured.py).

    python bench/measure_bits.py --ckpt CKPT --calib TRAIN_SHARD --bytes N[,N...] [--variants none,2,8,8both]
        [--model SPEC --model-config F] [--calib-tokens 131072]

For each byte budget and variant: squeeze --budget with the bench recipe of budget_vs_record.py (--quantize-small
routing: matrices of > 4,096 elements quantized), then verify --mirror on the fixture's validation shard: the even
part of the drift with its 95% window bootstrap, the grids kept on a measured price, the measurements made, the
compile time. Variants: `none` (the quadratic model alone: no EvenLoss), `B` (grids of B bits or fewer measured, as
shipped: prices only raised), `Bboth` (the same, but a measurement may also lower a price: the rejected design,
kept here to show why).
"""
import argparse
import dataclasses
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

import squeeze  # noqa: E402
from squeeze import budget, calibrate  # noqa: E402
from squeeze.passes import allocate  # noqa: E402
from squeeze.recipe import parse  # noqa: E402
from squeeze.verify import Verifier  # noqa: E402
import budget_vs_record  # noqa: E402


def both_ways(points: list, measured: dict, coarse_bits: int) -> list:
    """budget.measured_prices with a measurement taken as the price even where it is below the model's (and the
    ratio carried to unmeasured grids in both directions)."""
    ratios = sorted((p, e / p) for p, e in measured.values() if p > 0)
    out = []
    for o in points:
        if o.keep_float or o.bits > coarse_bits:
            out.append(o)
        elif budget.option_key(o) in measured:
            _, even = measured[budget.option_key(o)]
            out.append(dataclasses.replace(o, loss=max(even, 1e-12), measured=even))
        elif ratios and o.loss > 0:
            _, ratio = min(ratios, key=lambda pr: (abs(math.log(pr[0] / o.loss)), pr[0]))
            out.append(dataclasses.replace(o, loss=o.loss * max(ratio, 1e-3)))
        else:
            out.append(o)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--calib", required=True, help="training token shards (never the validation set)")
    ap.add_argument("--calib-tokens", type=int, default=131072)
    ap.add_argument("--bytes", required=True, help="comma-separated byte budgets")
    ap.add_argument("--variants", default="none,2,8,8both")
    ap.add_argument("--val", default=str(ROOT / "fixtures/val_000000.bin"))
    ap.add_argument("--tokenizer", default=str(ROOT / "fixtures/tokenizer_1024_bpe.model"))
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--model", default="pgolf")
    ap.add_argument("--model-config", default=None)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    sd = torch.load(args.ckpt, map_location="cpu", weights_only=True)
    cal = calibrate.calibration_for(sd, calib=args.calib, seq_len=args.seq_len, n_tokens=args.calib_tokens,
                                    device="cpu", with_sensitivities=True, model=args.model,
                                    model_config=args.model_config)
    recipe = parse(budget_vs_record.BUDGET_RECIPE.replace("65536", "4096"), "budget")
    verifier = Verifier(args.ckpt, args.val, args.tokenizer, seq_len=args.seq_len, device="cpu", model=args.model,
                        model_config=args.model_config)
    shipped, tmp = budget.measured_prices, Path(tempfile.mkdtemp(prefix="squeeze-measure-"))
    print(f"{args.ckpt}: calibration {cal.source}")
    print(f"{'budget':>9} {'variant':>7} {'bytes':>9} {'even':>9} {'95% bootstrap':>20} {'drift':>9} "
          f"{'kept':>4} {'made':>4} {'compile s':>9}")
    try:
        for size in (int(b) for b in args.bytes.split(",")):
            for variant in args.variants.split(","):
                budget.measured_prices = both_ways if variant.endswith("both") else shipped
                bits = int(variant.removesuffix("both")) if variant != "none" else 0
                config = dataclasses.replace(allocate.AllocateConfig.from_recipe(recipe), measure_bits=bits)
                made = []
                t = time.perf_counter()
                res = squeeze.compile_to_budget(sd, recipe, size, sensitivities=cal.sensitivities,
                                                hessians=cal.hessians, allocate_config=config,
                                                even_loss=None if variant == "none" else cal.even_loss,
                                                progress=lambda line: made.append(line.startswith("measured")))
                seconds = time.perf_counter() - t
                path = tmp / f"{size}_{variant}.sqz"
                path.write_bytes(res.blob)
                r = verifier.verify(path, mirror=True)
                lo, hi = r.drift_interval(part="even")
                print(f"{size:>9,} {variant:>7} {len(res.blob):>9,} {r.drift_even_bpb:>+9.5f} [{lo:+.5f}, {hi:+.5f}] "
                      f"{r.drift_bpb:>+9.5f} {len(res.measured):>4} {sum(made):>4} {seconds:>9.1f}", flush=True)
    finally:
        budget.measured_prices = shipped


if __name__ == "__main__":
    main()
