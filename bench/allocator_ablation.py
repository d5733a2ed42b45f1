"""What each candidate family buys the budget allocator, in its own currency: the predicted loss increase (nats/token)
at a fixed byte pool, for the matrices the allocator decides (issue 5: dead zone and low-rank corrections).

    python bench/allocator_ablation.py --ckpt CKPT --calib 'train_*.bin' [--calib-tokens 16384] [--max-numel 4096]

Families, each a set of (bytes, ΔL) candidates per tensor, reduced to its lower hull and allocated greedily exactly as
squeeze/passes/allocate.py does:
  grid       bit widths 2..8 × std clips, one scale per row;
  dead zone  the grid, each also rounded with a widened zero bin (|w| < (0.5 + θ)·Δ → 0, θ = 0.1..0.45): the
             entropy-coded rate falls, the error rises; squeeze does not ship it (see BENCHMARKS.md);
  groups+f16 the grid plus 128-element scale groups and keeping f16 (the allocator's default);
  low-rank   the default plus rank 4..32 corrections (off by default: see squeeze/passes/allocate.py).
A family helps where its predicted ΔL at the same pool is lower. Predictions only; bench/budget_vs_record.py measures.
"""
import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from squeeze import calibrate, quant  # noqa: E402
from squeeze.passes import allocate  # noqa: E402

DEAD_ZONES = (0.1, 0.2, 0.3, 0.45)


def dead_zone_options(entry, sensitivity: float, hessian, config: allocate.AllocateConfig) -> list:
    """The grid's candidates, each rounded plain and with every dead zone, priced as the allocator prices a grid
    (allocate.Pricing: its size and its loss measure)."""
    pricing = allocate.Pricing(entry, sensitivity, hessian)
    w2, cols = pricing.w2, pricing.cols
    points = []
    for bits in config.bits_choices:
        for k in config.clip_k_choices:
            spec = quant.QuantSpec(bits=bits, clip="std", clip_value=k)
            scales = quant.choose_scales(w2, spec)
            step = quant.expand_scales(scales, 0, cols)
            ratio = w2 / step
            for theta in (0.0,) + DEAD_ZONES:
                codes = torch.clamp(torch.round(ratio), -spec.qmax, spec.qmax)
                codes = torch.where(ratio.abs() < 0.5 + theta, torch.zeros_like(codes), codes)
                error = w2 - codes * step
                if float(error.double().square().mean()) > pricing.max_mse:
                    continue
                points.append(allocate.Option(bits, k + theta / 1000,  # θ rides in clip_k: unique
                                              allocate.coded_bytes(codes.to(torch.int8), scales),
                                              pricing.screening_loss(error)))
    return allocate.lower_hull(points)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-numel", type=int, default=4096, help="matrices of more elements are allocated")
    ap.add_argument("--bpp", default="2.5,3,3.5,4,5")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    sd = torch.load(args.ckpt, map_location="cpu", weights_only=True)
    cal = calibrate.calibration_for(sd, calib=args.calib, seq_len=args.seq_len, n_tokens=args.calib_tokens,
                                    device="cpu", with_sensitivities=True)
    names = [n for n in cal.sensitivities if sd[n].numel() > args.max_numel]
    params = sum(sd[n].numel() for n in names)

    class Entry:  # what options_for reads of a TensorEntry
        def __init__(self, name):
            self.name, self.tensor = name, sd[name]
            self.plan = type("P", (), {"quant": quant.QuantSpec()})()

    grid_config = allocate.AllocateConfig(group_choices=(), float_option=False)
    families = {
        "grid": {n: allocate.options_for(Entry(n), cal.sensitivities[n], grid_config, cal.hessians.get(n))
                 for n in names},
        "dead zone": {n: dead_zone_options(Entry(n), cal.sensitivities[n], cal.hessians.get(n), grid_config)
                      for n in names},
        "groups+f16": {n: allocate.options_for(Entry(n), cal.sensitivities[n], allocate.AllocateConfig(),
                                               cal.hessians.get(n)) for n in names},
        "low-rank": {n: allocate.options_for(Entry(n), cal.sensitivities[n],
                                             allocate.AllocateConfig(lowrank_ranks=(4, 8, 16, 32)),
                                             cal.hessians.get(n)) for n in names},
    }
    bpps = [float(x) for x in args.bpp.split(",")]
    print(f"{args.ckpt}: {len(names)} matrices, {params:,} params; calibration {cal.source}")
    print(f"{'family':<10} " + " ".join(f"{f'{b:g} b/p':>16}" for b in bpps))
    base = {}
    for family, options in families.items():
        cells = []
        for bpp in bpps:
            try:
                chosen = allocate.allocate(options, bpp * params / 8)
            except Exception:
                cells.append(f"{'-':>16}")
                continue
            loss = sum(o.loss for o in chosen.values())
            base.setdefault(bpp, loss)
            cells.append(f"{loss:>9.5f} ({loss / base[bpp]:.3f})")
        print(f"{family:<10} " + " ".join(cells))
    print("(predicted ΔL in nats/token of the allocated matrices; in brackets: × the grid's)")


if __name__ == "__main__":
    main()
